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

import pytest

from tests.support.kernelworld import KernelWorld, world
from tests.support.lp import wait_for, write_routes
from tests.support.netns import HOST_V4, ROOT
from tests.support.nslp import NO_NET_ADMIN, READ_ONLY_SYSCTLS

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
    write_routes(routes, {"many": {"scheme": "tcp4", "port": "20000-20999:30000-30999",
                                   "host": "127.0.0.1", "max_connections": "100"}})
    began = time.monotonic()
    lp = w.labelproxy(static(routes, LABELPROXY_LOG_LEVEL="debug"))

    def all_kernel() -> bool:
        doc = lp.routes()["routes"]
        return len(doc) == 1000 and all(r["forwarding"] == "kernel" for r in doc)

    wait_for(all_kernel, timeout=60, what=f"1,000 kernel routes\n{lp.log()}")
    ready = time.monotonic() - began
    w.serve("tcp", 30500)
    reply = w.remote.call("connect", host=HOST_V4, port=20500)
    assert w.remote.call("echo", conn=reply["conn"]) == {"ok": True}
    scrapes = []
    for _ in range(3):
        start, cpu = time.monotonic(), process_cpu(lp.proc.pid)
        text = lp.metrics()
        scrapes.append((time.monotonic() - start, process_cpu(lp.proc.pid) - cpu))
    samples = [x for x in text.splitlines() if x.startswith("labelproxy_ip_bytes_total{")]
    assert len(samples) == 2000
    assert 'labelproxy_connections_total{listen="tcp://0.0.0.0:20500",route="many"} 1.0' in text
    log = lp.log_path.read_text()
    [(wall, cpu)] = re.findall(r"kernel: 1000 routes forwarded, 0 refused, applied in ([\d.]+) "
                               r"ms \(CPU ([\d.]+) ms\)", log)
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
    doc = {r["route"]: r for r in lp.routes()["routes"]}
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
