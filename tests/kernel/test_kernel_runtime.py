"""LABELPROXY_FORWARDING and the kernel path at scale, with a real labelproxy process and a
routes file, inside namespaces the test creates (no Docker engine needed here).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kernelworld import KernelWorld, world
from tests.support.lp import wait_for, write_routes
from tests.support.netns import CLIENT_V4, HOST_V4, ROOT
from tests.support.nslp import NO_NET_ADMIN, READ_ONLY_SYSCTLS
from tests.support.ports import consecutive_free_ports

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared() -> Iterator[KernelWorld]:
    yield from world(docker=False)


@pytest.fixture
def w(shared: KernelWorld) -> Iterator[KernelWorld]:
    yield shared
    shared.cleanup_test()


def static(routes: Path, **extra: str) -> dict[str, str]:
    return {"LABELPROXY_ROUTES_FILE": str(routes), **extra}


def test_without_cap_net_admin_auto_falls_back_to_the_relay_and_says_why(
    w: KernelWorld, tmp_path: Path
) -> None:
    upstream = w.serve("tcp", 9701)
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"web": {"port": "8701:9701", "host": "127.0.0.1"}})
    lp = w.labelproxy(static(routes), without=NO_NET_ADMIN)
    route = lp.route("web")
    assert route is not None and route["forwarding"] == "relay"
    reason = route["forwarding_reason"]
    assert reason.startswith("nftables unavailable: ") and "Operation not permitted" in reason
    reply = w.remote.call("connect", host=HOST_V4, port=8701)
    assert w.remote.call("echo", conn=reply["conn"]) == {"ok": True}
    assert w.peers(upstream) == ["127.0.0.1"]  # relayed
    assert lp.log().count("forwarding: every route on the relay: nftables unavailable") == 1
    assert lp.metric("labelproxy_route_info", route="web", listen="tcp://[::]:8701",
                     scheme="tcp", targets="127.0.0.1:9701", forwarding="relay") == 1
    assert w.nft("list", "tables") == ""


def test_forwarding_kernel_without_cap_net_admin_stops_start_up_with_one_line(
    w: KernelWorld,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELPROXY_")}
    env.update(LABELPROXY_FORWARDING="kernel", LABELPROXY_DOCKER_HOST="none",
               LABELPROXY_HTTP_ADDR="127.0.0.1:0")
    done = subprocess.run(
        ["ip", "netns", "exec", w.ns, *NO_NET_ADMIN, sys.executable, "-m", "labelproxy"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("labelproxy: ")]
    assert line.startswith("labelproxy: LABELPROXY_FORWARDING=kernel, but nftables unavailable")
    assert "Operation not permitted" in line


def test_a_thousand_kernel_routes_are_applied_and_scraped_in_under_a_second(
    w: KernelWorld, tmp_path: Path
) -> None:
    routes = tmp_path / "routes.yaml"
    # from the suite's port pool, as every other test's ports in this world: no collision
    listen, target = consecutive_free_ports(1000), consecutive_free_ports(1000)
    write_routes(routes, {"many": {"scheme": "tcp4",
                                   "port": f"{listen}-{listen + 999}:{target}-{target + 999}",
                                   "host": "127.0.0.1", "max_connections": "100"}})
    began = time.monotonic()
    lp = w.labelproxy(static(routes, LABELPROXY_LOG_LEVEL="debug"))

    def all_kernel() -> bool:
        doc = lp.routes()["routes"]
        return len(doc) == 1000 and all(r["forwarding"] == "kernel" for r in doc)

    wait_for(all_kernel, timeout=60, what=f"1,000 kernel routes\n{lp.log()}")
    ready = time.monotonic() - began
    w.serve("tcp", target + 500)
    w.serve("tcp", target)  # a range is checked on its first port: every port follows it

    def in_pool() -> bool:  # its check passes `rise` times, then the kernel's pool has it
        doc = next(r for r in lp.routes()["routes"]
                   if r["listen"] == f"tcp://0.0.0.0:{listen + 500}")
        return bool(doc["kernel"]["backends"] == [f"127.0.0.1:{target + 500}"])

    wait_for(in_pool, timeout=30,
             what=f"the served backend in the kernel's pool\n{lp.log()[-3000:]}")
    reply = w.remote.call("connect", host=HOST_V4, port=listen + 500)
    assert w.remote.call("echo", conn=reply["conn"]) == {"ok": True}
    scrapes = []
    for _ in range(3):
        start, cpu = time.monotonic(), process_cpu(lp.proc.pid)
        text = lp.metrics()
        scrapes.append((time.monotonic() - start, process_cpu(lp.proc.pid) - cpu))
    samples = [x for x in text.splitlines() if x.startswith("labelproxy_ip_bytes_total{")]
    assert len(samples) == 2000
    assert (f'labelproxy_connections_total{{listen="tcp://0.0.0.0:{listen + 500}",route="many"}}'
            " 1.0") in text
    log = lp.log_path.read_text()
    # the first apply (the pool refreshes that follow the checks are logged alike)
    (wall, cpu), *_ = re.findall(r"kernel: 1000 routes forwarded, 0 refused, applied in "
                                 r"([\d.]+) ms \(CPU ([\d.]+) ms\)", log)
    print(f"\n1,000 kernel routes: ready (bound, applied) in {ready:.2f}s, the apply {wall} ms "
          f"wall / {cpu} ms CPU; /metrics " + ", ".join(f"{w:.3f}s wall / {c:.3f}s CPU"
                                                        for w, c in scrapes))
    # CPU time (labelproxy's and the nft it ran): wall time on a shared machine measures its load
    assert float(cpu) < 1000, (wall, cpu)
    assert min(c for _, c in scrapes) < 1.0, scrapes
    assert "route forwarding: kernel (1000 ports)" in log


def process_cpu(pid: int) -> float:
    """utime + stime of `pid` and of its waited-for children (the `nft` it ran), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def test_where_route_localnet_cannot_be_switched_on_the_routes_needing_it_stay_on_the_relay(
    w: KernelWorld, tmp_path: Path
) -> None:
    """labelproxy in a container: /proc/sys is read-only. A loopback backend behind a wildcard
    bind needs route_localnet for remote clients: relayed, and the reason says what to set;
    a loopback-only route does not need it and is forwarded."""
    wide, own = w.serve("tcp", 9801), w.serve("tcp", 9802)
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {
        "wide": {"scheme": "tcp4", "port": "8801:9801", "host": "127.0.0.1"},
        "own": {"scheme": "tcp4", "bind": "127.0.0.1", "port": "8802:9802",
                "host": "127.0.0.1"},
    })  # fmt: skip
    before = w.host.call("sysctl", name="net.ipv4.conf.all.route_localnet")
    lp = w.labelproxy(static(routes), without=READ_ONLY_SYSCTLS)

    def checked() -> dict[str, dict[str, Any]] | None:  # both backends' checks passed
        found = {r["route"]: r for r in lp.routes()["routes"]}
        up = all(b["ready"] for r in found.values() for b in r["backends"])
        return found if up and found["own"].get("kernel", {}).get("backends") else None

    doc = wait_for(checked, what="both routes' backends ready")
    assert doc["own"]["forwarding"] == "kernel"
    assert (doc["wide"]["forwarding"], doc["wide"]["forwarding_reason"]) == (
        "relay", "remote clients of the loopback backend 127.0.0.1:9801 need "
        "net.ipv4.conf.all.route_localnet=1, which labelproxy cannot set here "
        "(Read-only file system)")
    reply = w.remote.call("connect", host=HOST_V4, port=8801)
    assert w.remote.call("echo", conn=reply["conn"]) == {"ok": True}
    reply = w.host.call("connect", host="127.0.0.1", port=8802)
    assert w.host.call("echo", conn=reply["conn"]) == {"ok": True}
    assert (w.peers(wide), w.peers(own)) == (["127.0.0.1"], ["127.0.0.1"])
    assert w.kernel_routes() == ["tcp://127.0.0.1:8802 own"]
    assert w.host.call("sysctl", name="net.ipv4.conf.all.route_localnet") == before == "0"


def test_a_backend_failing_its_check_leaves_the_kernel_pool_and_returns_after_rise(
    w: KernelWorld, tmp_path: Path
) -> None:
    """Kernel pools follow the active checks as the relay's do: a backend that stops
    listening leaves the nftables pool within fall x interval (new flows all go to the other),
    comes back after `rise` passes, and a route with no ready backend refuses new flows."""
    interval, fall, rise = 0.3, 2, 2
    first, second = w.serve("tcp", 9901), w.serve("tcp", 9902)
    a, b = "127.0.0.1:9901", "127.0.0.1:9902"
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"pool": {
        "scheme": "tcp4", "port": "8901", "hosts": [a, b],
        "healthcheck.interval": f"{interval}s", "healthcheck.fall": str(fall),
        "healthcheck.rise": str(rise),
    }})  # fmt: skip
    lp = w.labelproxy(static(routes))

    def pool() -> list[str]:
        route = lp.route("pool")
        assert route is not None and route["forwarding"] == "kernel", route
        found: list[str] = route["kernel"]["backends"]
        return found

    def remote_flows(server: int) -> int:
        counts: dict[str, int] = w.host.call("peer_counts", server=server)
        return counts.get(CLIENT_V4, 0)  # the checks come from 127.0.0.1

    def connect_times(n: int) -> None:
        for _ in range(n):
            reply = w.remote.call("connect", host=HOST_V4, port=8901)
            assert "conn" in reply, reply
            assert w.remote.call("echo", conn=reply["conn"]) == {"ok": True}
            w.remote.call("close", conn=reply["conn"])

    wait_for(lambda: pool() == [a, b], what=f"both backends in the kernel pool\n{lp.log()}")
    connect_times(4)
    assert remote_flows(first) > 0 and remote_flows(second) > 0  # round robin: both used

    w.host.call("unserve", server=second)  # stops listening
    began = time.monotonic()
    wait_for(lambda: pool() == [a], timeout=10, what="the stopped backend out of the pool")
    # fall failed checks, the one in flight, then one nft transaction (and /routes polling)
    assert time.monotonic() - began < fall * interval * 1.1 + interval + 1.0
    down = next(x for x in lp.route("pool")["backends"] if x["address"] == b)  # type: ignore[index]
    assert down["state"] == "down" and "refused" in down["last_error"].lower(), down
    before = remote_flows(first)
    connect_times(4)  # all to the one left (a flow to the stopped one would be refused)
    assert remote_flows(first) == before + 4

    again = w.serve("tcp", 9902)  # listens again
    began = time.monotonic()
    wait_for(lambda: pool() == [a, b], timeout=10, what="the backend back after rise passes")
    assert time.monotonic() - began >= (rise - 1) * interval * 0.9
    connect_times(4)
    assert remote_flows(again) > 0

    # no ready backend: the kernel refuses new flows, counted as no_backend
    w.host.call("unserve", server=first)
    w.host.call("unserve", server=again)
    wait_for(lambda: pool() == [], timeout=10, what="an empty kernel pool")
    assert w.remote.call("connect", host=HOST_V4, port=8901) == {"error": "refused"}
    assert lp.metric("labelproxy_connections_rejected_total", route="pool",
                     listen="tcp://0.0.0.0:8901", reason="no_backend") == 1
    assert "backend not ready" in lp.log()
