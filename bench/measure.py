"""One measurement of one data-plane section through one target.

Every function runs a bounded load (a count and a time limit) through `target`'s listen port
for the section's route and returns a `Measured`: metric name -> value, plus the raw tool
output for the JSON file. A load that fails raises `BenchError`; the caller records it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from bench.procs import BenchError, Children, cpu_seconds, cpu_split, pss_bytes, read_line
from bench.targets import Target
from bench.toolchain import Tools
from bench.upstreams import Upstreams

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
SHORT_CONN_CLIENTS = 50
SHORT_CONN_BYTES = 64
PINGPONG_BYTES = 64
UDP_FLOOD_BYTES = 512
UDP_RTT_BYTES = 64
WRK_CONNECTIONS = 50


@dataclass(frozen=True, slots=True)
class Plan:
    """How much load each measurement applies; `quick` shrinks everything to seconds."""

    reps: int = 3
    bulk_seconds: int = 3
    bulk_bytes: str = ""  # iperf3 -n instead of -t when set
    short_seconds: float = 2.0
    wrk_seconds: int = 2
    pingpong_count: int = 5000
    udp_count: int = 300_000
    udp_rtt_count: int = 2000
    hold_conns: int = 5000
    starts: int = 20
    containers: int = 1000

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            reps=1,
            bulk_bytes="64M",
            short_seconds=0.3,
            wrk_seconds=1,
            pingpong_count=200,
            udp_count=5000,
            udp_rtt_count=100,
            hold_conns=100,
            starts=3,
            containers=10,
        )


@dataclass(slots=True)
class Measured:
    values: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Env:
    """What a measurement needs besides the target."""

    plan: Plan
    tools: Tools
    upstreams: Upstreams
    children: Children


def _run_json(
    argv: list[str], *, timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} {argv[1]} timed out after {timeout:.0f}s") from None
    try:
        data: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise BenchError(
            f"{' '.join(argv[:2])} exited {result.returncode}: {result.stderr.strip()[-300:]}"
        ) from None
    return data


def tcp_bulk(env: Env, target: Target, *, streams: int) -> Measured:
    """iperf3 through the target: Gbit/s received, and the proxy's CPU seconds per GB moved."""
    argv = ["iperf3", "-c", HOST, "-p", str(target.ports["iperf"]), "-J", "-P", str(streams)]
    plan = env.plan
    argv += ["-n", plan.bulk_bytes] if plan.bulk_bytes else ["-t", str(plan.bulk_seconds)]
    cpu_before = cpu_seconds(target.roots)
    for _attempt in range(10):
        data = _run_json(argv, timeout=plan.bulk_seconds + 30)
        if "busy" not in str(data.get("error", "")):
            break
        time.sleep(0.2)  # the persistent iperf3 server is still closing the previous test
    cpu = cpu_seconds(target.roots) - cpu_before
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    received = data["end"]["sum_received"]
    gigabytes = float(received["bytes"]) / 1e9
    out = Measured(raw={"bytes": received["bytes"], "seconds": received["seconds"], "cpu_s": cpu})
    out.values[f"tcp_bulk_{streams}_gbps"] = float(received["bits_per_second"]) / 1e9
    if target.roots and gigabytes > 0:
        out.values[f"tcp_bulk_{streams}_cpu_s_per_gb"] = cpu / gigabytes
    return out


def short_conns(env: Env, target: Target) -> Measured:
    """Connections/s: connect, 64 B request, echo, close; 50 concurrent clients."""
    seconds = env.plan.short_seconds
    argv = [str(env.tools.client), "shortconn", HOST, str(target.ports["echo"])]
    argv += [str(SHORT_CONN_CLIENTS), str(seconds), str(SHORT_CONN_BYTES)]
    before = cpu_split(target.roots)
    data = _run_json(argv, timeout=seconds + 30)
    if data["completed"] == 0:
        raise BenchError(f"no connection completed ({data['errors']} errors)")
    out = Measured(values={"short_conns_per_s": float(data["rate"])}, raw=data)
    _cpu_per(out, target, before, int(data["completed"]), "short_conns")
    return out


def _cpu_per(
    out: Measured, target: Target, before: tuple[float, float], count: int, key: str
) -> None:
    """The proxy's user and kernel CPU microseconds per unit of work (a connection, a
    message) since `before`: where a proxy's time goes, interpreter or system calls."""
    if not target.roots or count <= 0:
        return
    user, system = cpu_split(target.roots)
    out.values[f"{key}_user_us"] = (user - before[0]) * 1e6 / count
    out.values[f"{key}_sys_us"] = (system - before[1]) * 1e6 / count


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_latency_ms(text: str, percent: str) -> float:
    match = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if match is None:
        raise BenchError(f"wrk printed no {percent}% latency")
    return float(match.group(1)) * _WRK_UNITS[match.group(2)]


def http(env: Env, target: Target, *, close: bool) -> Measured:
    """wrk against the nginx upstream through the target: requests/s, p50 and p99 latency."""
    seconds = env.plan.wrk_seconds
    argv = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{target.ports['http']}/")
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError("wrk timed out") from None
    text = result.stdout
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    if result.returncode != 0 or rps is None:
        raise BenchError(f"wrk exited {result.returncode}: {result.stderr.strip()[-300:]}")
    errors = re.search(r"Socket errors: (.*)$", text, re.MULTILINE)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    kind = "close" if close else "keepalive"
    return Measured(
        values={
            f"http_{kind}_rps": float(rps.group(1)),
            f"http_{kind}_p50_ms": _wrk_latency_ms(text, "50"),
            f"http_{kind}_p99_ms": _wrk_latency_ms(text, "99"),
        },
        raw={
            "socket_errors": errors.group(1) if errors else "",
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        },
    )


def pingpong(env: Env, target: Target) -> Measured:
    """64 B request/response round trips over one connection: p50 and p99 in microseconds."""
    argv = [str(env.tools.client), "pingpong", HOST, str(target.ports["echo"])]
    argv += [str(env.plan.pingpong_count), str(PINGPONG_BYTES), "10"]
    before = cpu_split(target.roots)
    data = _run_json(argv, timeout=40)
    out = Measured(
        values={"pingpong_p50_us": float(data["p50_us"]), "pingpong_p99_us": float(data["p99_us"])},
        raw=data,
    )
    _cpu_per(out, target, before, 2 * env.plan.pingpong_count, "pingpong_msg")  # both ways
    return out


def udp_flood(env: Env, target: Target) -> Measured:
    """512 B datagrams at the sender's max rate, a fixed count: delivered/s and loss."""
    sink = env.upstreams.sink
    sink.report()  # start from zero
    argv = [str(env.tools.client), "udpflood", HOST, str(target.ports["usink"])]
    argv += [str(env.plan.udp_count), str(UDP_FLOOD_BYTES), "0"]
    sent = _run_json(argv, timeout=60)
    got = sink.report()
    span = (got.last_ns - int(sent["start_ns"])) / 1e9
    delivered = got.received / span if got.received and span > 0 else 0.0
    loss = 100.0 * (1.0 - got.received / max(1, int(sent["sent"])))
    return Measured(
        values={"udp_delivered_per_s": delivered, "udp_loss_pct": loss},
        raw={"sent": sent, "received": got.received, "span_s": span},
    )


def udp_rtt(env: Env, target: Target) -> Measured:
    """64 B datagram echo round trips, one at a time: p50 and p99 in microseconds."""
    argv = [str(env.tools.client), "udprtt", HOST, str(target.ports["uecho"])]
    argv += [str(env.plan.udp_rtt_count), str(UDP_RTT_BYTES), "200", "10"]
    data = _run_json(argv, timeout=40)
    if data["count"] == 0:
        raise BenchError(f"no datagram came back ({data['lost']} lost)")
    return Measured(
        values={"udp_rtt_p50_us": float(data["p50_us"]), "udp_rtt_p99_us": float(data["p99_us"])},
        raw=data,
    )


def idle_memory(env: Env, target: Target) -> Measured:
    """PSS growth of the proxy per idle TCP connection, N connections held (one echo each)."""
    count = env.plan.hold_conns
    before = pss_bytes(target.roots)
    argv = [str(env.tools.client), "hold", HOST, str(target.ports["echo"]), str(count), "60"]
    proc = env.children.start(argv, name="hold-client", stdout_pipe=True, stdin_pipe=True)
    try:
        assert proc.stdout is not None
        data = json.loads(read_line(proc.stdout, timeout=90))
        after = pss_bytes(target.roots)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the client closes its connections and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        env.children.stop(proc)
    ready = int(data["ready"])
    if ready < count:
        raise BenchError(f"only {ready} of {count} connections established ({data})")
    raw = {"pss_before": before, "pss_after": after, **data}
    return Measured(values={"memory_bytes_per_conn": (after - before) / ready}, raw=raw)
