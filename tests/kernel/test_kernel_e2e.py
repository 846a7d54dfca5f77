"""Kernel forwarding end to end: a real labelproxy process and a private dockerd, both inside a
network namespace the test creates, and a remote client in a second one (veth, documentation
addresses). Labelled host-network containers become routes nftables forwards; what a user
sees is checked: who the upstream sees, what is refused, /routes, /metrics, and what a
removal, a SIGKILL and a restart do to established flows. Never the host's own namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.baseimage import BaseImageError
from tests.support.image import build_image
from tests.support.kernelworld import KernelWorld, world
from tests.support.lp import wait_for
from tests.support.netns import CLIENT_V4, HOST_V4, HOST_V6, ROOT
from tests.support.nslp import NsLabelproxy

pytestmark = [pytest.mark.slow, pytest.mark.docker]


@pytest.fixture(scope="module")
def shared() -> Iterator[KernelWorld]:
    yield from world(docker=True)


@pytest.fixture
def w(shared: KernelWorld) -> Iterator[KernelWorld]:
    yield shared
    shared.cleanup_test()


def on_path(lp: NsLabelproxy, alias: str, path: str = "kernel") -> dict[str, object]:
    """Wait until route `alias` is up on `path`; its /routes entry."""
    def found() -> dict[str, object] | None:
        route = lp.route(alias)
        return route if route and route["state"] == "up" and route["forwarding"] == path \
            else None  # fmt: skip
    return wait_for(found, timeout=30, what=f"route {alias} up on the {path} path\n{lp.log()}")


def connect(w: KernelWorld, host: str, port: int, *, local: bool = False) -> int:
    """A TCP connection from the remote namespace (or a loopback client) that echoes once."""
    agent = w.host if local else w.remote
    reply = agent.call("connect", host=host, port=port)
    assert "conn" in reply, f"connect to {host}:{port}: {reply}"
    assert agent.call("echo", conn=reply["conn"]) == {"ok": True}
    conn: int = reply["conn"]
    return conn


def test_labelled_containers_tcp_and_udp_routes_are_forwarded_by_the_kernel(
    w: KernelWorld,
) -> None:
    web_up, dns_up = w.serve("tcp", 9101), w.serve("udp", 9102)
    # no active check: the upstreams below list every peer they saw (a check would be one)
    w.run({"proxy.web.port": "8101:9101", "proxy.web.healthcheck": "none"})
    w.run({"proxy.dns.port": "8102:9102", "proxy.dns.scheme": "udp4"})
    w.run({"proxy.echo.port": "8103:9103"}, ["nc", "-ll", "-p", "9103", "-e", "cat"])
    lp = w.labelproxy({})
    web = on_path(lp, "web")
    assert (web["forwarding_reason"], web["client_address_hidden"]) == ("", False)
    kernel = web["kernel"]
    assert isinstance(kernel, dict)
    assert (kernel["families"], kernel["uncovered"]) == (["ipv4"], ["ipv6"])
    on_path(lp, "dns")
    on_path(lp, "echo")

    # TCP from the remote machine and from the host itself: the upstream sees each client
    connect(w, HOST_V4, 8101)
    connect(w, "127.0.0.1", 8101, local=True)
    assert w.peers(web_up) == [CLIENT_V4, "127.0.0.1"]
    # an IPv6 client of the dual-stack route with an IPv4 backend: the relay carries it
    connect(w, HOST_V6, 8101)
    assert w.host.call("peers", server=web_up) == {"peers": [CLIENT_V4, "127.0.0.1"],
                                                   "accepted": 3}
    # the busybox container's own echo server
    connect(w, HOST_V4, 8103)
    # UDP from both
    remote = w.remote.call("udp_open", host=HOST_V4, port=8102)
    local = w.host.call("udp_open", host="127.0.0.1", port=8102)
    assert w.remote.call("udp_echo", sock=remote, count=3) == {"replies": 3}
    assert w.host.call("udp_echo", sock=local, count=2) == {"replies": 2}
    assert w.peers(dns_up) == [CLIENT_V4, "127.0.0.1"]

    web_ids = {"route": "web", "listen": "tcp://[::]:8101"}
    dns_ids = {"route": "dns", "listen": "udp://0.0.0.0:8102"}
    assert lp.metric("labelproxy_route_info", **web_ids, scheme="tcp",
                     targets="127.0.0.1:9101", forwarding="kernel") == 1
    # two flows in the kernel, one (IPv6) through the relay
    assert lp.metric("labelproxy_connections_total", **web_ids) == 3
    assert lp.metric("labelproxy_udp_datagrams_total", **dns_ids, direction="in") == 5
    assert lp.metric("labelproxy_ip_packets_total", **dns_ids, direction="out") == 5
    # series only the relay can measure are absent for kernel routes
    assert lp.metric("labelproxy_bytes_total", **web_ids, direction="in") is None
    assert lp.metric("labelproxy_connection_duration_seconds_count", **web_ids) is None

    table = subprocess.run(
        ["ip", "netns", "exec", w.ns, sys.executable, "-m", "labelproxy", "routes",
         "--url", lp.base], capture_output=True, text=True, timeout=30, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    row = next(line for line in table.splitlines() if line.startswith("web "))
    assert " kernel " in row and "tcp://[::]:8101" in row, table
    assert "route forwarding: kernel" in lp.log()


def test_acl_deny_and_max_connections_are_enforced_in_the_kernel(w: KernelWorld) -> None:
    w.serve("tcp", 9201)
    w.serve("tcp", 9202)
    w.serve("udp", 9203)
    w.run({"proxy.acl.port": "8201:9201", "proxy.acl.deny": f"{CLIENT_V4}/32"})
    w.run({"proxy.cap.port": "8202:9202", "proxy.cap.max_connections": "2"})
    w.run({"proxy.uacl.port": "8203:9203", "proxy.uacl.scheme": "udp4",
           "proxy.uacl.allow": "127.0.0.0/8"})
    lp = w.labelproxy({})
    for alias in ("acl", "cap", "uacl"):
        on_path(lp, alias)

    assert w.remote.call("connect", host=HOST_V4, port=8201) == {"error": "refused"}
    connect(w, "127.0.0.1", 8201, local=True)  # everyone else passes
    first = connect(w, HOST_V4, 8202)
    connect(w, HOST_V4, 8202)
    assert w.remote.call("connect", host=HOST_V4, port=8202) == {"error": "refused"}
    w.remote.call("close", conn=first)  # its conntrack entry leaves ESTABLISHED: a slot frees
    wait_for(lambda: lp.metric("labelproxy_connections_active", route="cap",
                               listen="tcp://[::]:8202") == 1, what="the closed flow counted out")
    connect(w, HOST_V4, 8202)
    sock = w.remote.call("udp_open", host=HOST_V4, port=8203)
    assert w.remote.call("udp_echo", sock=sock, count=2, timeout=0.5) == {"replies": 0}

    def rejected(alias: str, listen: str, reason: str) -> float | None:
        return lp.metric("labelproxy_connections_rejected_total", route=alias, listen=listen,
                         reason=reason)

    assert rejected("acl", "tcp://[::]:8201", "acl") == 1
    assert rejected("cap", "tcp://[::]:8202", "limit") == 1
    assert rejected("cap", "tcp://[::]:8202", "acl") == 0
    assert lp.metric("labelproxy_connections_total", route="cap", listen="tcp://[::]:8202") == 3
    assert lp.metric("labelproxy_udp_datagrams_dropped_total", route="uacl",
                     listen="udp://0.0.0.0:8203", reason="acl") == 2


def test_a_route_removed_mid_transfer_drains_and_is_cut_at_the_deadline(w: KernelWorld) -> None:
    w.serve("tcp", 9301)
    container = w.run({"proxy.gone.port": "8301:9301"})
    lp = w.labelproxy({"LABELPROXY_DRAIN_TIMEOUT": "4s"})
    on_path(lp, "gone")
    conn = connect(w, HOST_V4, 8301)

    removed = time.monotonic()  # before the call: labelproxy may see the removal before it returns
    container.remove(force=True)
    wait_for(lambda: lp.route("gone") is None, what="route gone from /routes")
    # /routes shows the desired state; the relay's listener closes in the same pass, just after
    wait_for(lambda: w.remote.call("connect", host=HOST_V4, port=8301) == {"error": "refused"},
             timeout=5, what="new flows refused once the route is gone")  # fmt: skip
    # the established flow goes on (through conntrack) until the drain deadline...
    while time.monotonic() - removed < 3.0:
        assert w.remote.call("echo", conn=conn, size=20_000) == {"ok": True}
        time.sleep(0.5)
    # ...and is cut then
    def cut() -> bool:
        return bool(w.remote.call("echo", conn=conn, timeout=1.0) == {"error": "reset"})
    wait_for(cut, timeout=10, what="the draining flow cut at the deadline")
    assert time.monotonic() - removed >= 4.0
    # the log line follows the cut (conntrack first, then the line): wait for it
    wait_for(lambda: "drain deadline of 1 removed routes" in lp.log(), timeout=5,
             what="the drain cut logged")
    assert w.kernel_routes() == []


def test_metrics_counters_match_the_traffic(w: KernelWorld) -> None:
    w.serve("tcp", 9401)
    w.serve("udp", 9402)
    w.run({"proxy.t.port": "8401:9401", "proxy.t.scheme": "tcp4"})
    w.run({"proxy.u.port": "8402:9402", "proxy.u.scheme": "udp4"})
    lp = w.labelproxy({})
    on_path(lp, "t")
    on_path(lp, "u")
    conns = [connect(w, HOST_V4, 8401) for _ in range(3)]
    for conn in conns:
        assert w.remote.call("echo", conn=conn, size=20_000) == {"ok": True}
    sock = w.remote.call("udp_open", host=HOST_V4, port=8402)
    assert w.remote.call("udp_echo", sock=sock, size=500, count=7) == {"replies": 7}

    t = {"route": "t", "listen": "tcp://0.0.0.0:8401"}
    u = {"route": "u", "listen": "udp://0.0.0.0:8402"}
    assert lp.metric("labelproxy_connections_total", **t) == 3
    assert lp.metric("labelproxy_connections_active", **t) == 3
    payload = 3 * (1000 + 20_000)  # connect() echoes 1000 bytes, then 20,000
    for way in ("in", "out"):
        packets = lp.metric("labelproxy_ip_packets_total", **t, direction=way)
        octets = lp.metric("labelproxy_ip_bytes_total", **t, direction=way)
        assert packets is not None and octets is not None
        # IP bytes = payload + 40..120 bytes of IPv4 and TCP headers per packet
        assert payload + 40 * packets <= octets <= payload + 120 * packets, (way, octets)
    assert lp.metric("labelproxy_udp_datagrams_total", **u, direction="in") == 7
    assert lp.metric("labelproxy_udp_datagrams_total", **u, direction="out") == 7
    assert lp.metric("labelproxy_ip_bytes_total", **u, direction="in") == 7 * (500 + 28)
    assert lp.metric("labelproxy_udp_sessions_active", **u) == 1
    route = lp.route("t")
    assert route is not None
    counters = wait_for(lambda: (r := lp.route("t")) and r["counters"].get(
        "kernel_counters_age", 9) < 1.0 and r["counters"], what="fresh kernel counters")
    assert counters["connections_total"] == 3 and counters["connections_active"] == 3


def test_sigkill_and_restart_adopt_the_table_cut_no_flow_and_leave_nothing_stale(
    w: KernelWorld,
) -> None:
    web_up = w.serve("tcp", 9501)
    w.serve("tcp", 9502)
    w.run({"proxy.web.port": "8501:9501", "proxy.web.healthcheck": "none"})
    gone = w.run({"proxy.old.port": "8502:9502"})
    env = {"LABELPROXY_DRAIN_TIMEOUT": "3s"}
    first = w.labelproxy(env)
    on_path(first, "web")
    on_path(first, "old")
    established = connect(w, HOST_V4, 8501)
    draining = connect(w, HOST_V4, 8502)

    first.kill()  # SIGKILL: no shutdown at all; the table goes on forwarding
    assert w.remote.call("echo", conn=established) == {"ok": True}
    connect(w, HOST_V4, 8501)
    gone.remove(force=True)  # a route that goes away while labelproxy is down

    second = w.labelproxy(env)
    assert "kernel table adopted (2 routes" in second.log()
    on_path(second, "web")
    assert w.remote.call("echo", conn=established) == {"ok": True}  # not cut by the restart
    ids = {"route": "web", "listen": "tcp://[::]:8501"}
    assert second.metric("labelproxy_connections_total", **ids) == 2  # kept across the restart
    assert second.metric("labelproxy_connections_active", **ids) == 2
    assert w.peers(web_up) == [CLIENT_V4]

    # the route that did not come back: no new flows, its flow drains and is cut
    assert w.remote.call("connect", host=HOST_V4, port=8502) == {"error": "refused"}
    assert w.remote.call("echo", conn=draining) == {"ok": True}
    wait_for(lambda: w.remote.call("echo", conn=draining, timeout=1.0) == {"error": "reset"},
             timeout=10, what="the old route's flow cut at its deadline")
    assert w.kernel_routes() == ["tcp://[::]:8501 web"]
    assert w.remote.call("echo", conn=established) == {"ok": True}

    assert second.stop() == 0  # a clean stop drains, then removes the table
    assert "labelproxy" not in w.nft("list", "tables")


def test_forwarding_relay_label_keeps_a_route_on_the_relay(w: KernelWorld) -> None:
    upstream = w.serve("tcp", 9601)
    w.run({"proxy.rel.port": "8601:9601", "proxy.rel.forwarding": "relay"})
    lp = w.labelproxy({})
    route = on_path(lp, "rel", "relay")
    assert route["forwarding_reason"] == "forwarding: relay asked for by the route"
    connect(w, HOST_V4, 8601)
    assert w.peers(upstream) == ["127.0.0.1"]  # the relay dialled it, not the client
    ids = {"route": "rel", "listen": "tcp://[::]:8601"}
    wait_for(lambda: lp.metric("labelproxy_bytes_total", **ids, direction="in") == 1000,
             what="relay bytes counted")
    assert lp.metric("labelproxy_ip_bytes_total", **ids, direction="in") is None
    assert lp.metric("labelproxy_route_info", **ids, scheme="tcp", targets="127.0.0.1:9601",
                     forwarding="relay") == 1
    assert w.kernel_routes() == []


def test_the_image_run_as_compose_runs_it_forwards_in_the_kernel(
    w: KernelWorld, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """compose.yaml's way: uid 0, every capability dropped but NET_ADMIN, read-only, no new
    privileges, host networking. The kernel forwards a loopback route; a route that remote
    clients reach on a loopback backend needs route_localnet, which a container cannot set
    (read-only /proc/sys): it is relayed, and /routes says what to set."""
    assert w.engine is not None and w.client is not None
    try:
        image = build_image(w.engine, tag="labelproxy-test/labelproxy:kernel",
                            workdir=tmp_path_factory.mktemp("kernel-image"))
    except BaseImageError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the image test needs a local base image in CI: {exc}", pytrace=False)
        pytest.skip(f"cannot make the local base image: {exc}")
    w.host.call("sysctl", name="net.ipv4.conf.all.route_localnet", value="0")
    own, wide = w.serve("tcp", 9701), w.serve("tcp", 9702)
    w.run({"proxy.own.port": "8701:9701", "proxy.own.bind": "127.0.0.1"})
    w.run({"proxy.wide.port": "8702:9702", "proxy.wide.scheme": "tcp4"})
    proxy = w.client.containers.run(
        image, detach=True, network_mode="host", user="0:0", cap_drop=["ALL"],
        cap_add=["NET_ADMIN"], read_only=True, security_opt=["no-new-privileges:true"],
        volumes={str(w.engine.socket_path): {"bind": "/var/run/docker.sock", "mode": "ro"}},
        environment={"LABELPROXY_HTTP_ADDR": "127.0.0.1:9465", "LABELPROXY_DRAIN_TIMEOUT": "1s"},
    )  # fmt: skip

    def routes() -> dict[str, dict[str, object]] | None:
        reply = w.host.call("http_get", url="http://127.0.0.1:9465/routes", timeout=2.0)
        if reply["status"] != 200:
            return None
        found = {r["route"]: r for r in json.loads(reply["body"])["routes"]}
        # up, and through the first kernel apply (which follows the listeners' start)
        return found if {"own", "wide"} <= set(found) and all(
            r["state"] == "up" and r["forwarding_reason"] != "not applied to the kernel yet"
            for r in found.values()) else None  # fmt: skip

    logs = proxy.logs
    doc = wait_for(routes, timeout=60, what=f"the image's routes\n{logs().decode()[-3000:]}")
    assert (doc["own"]["forwarding"], doc["own"]["client_address_hidden"]) == ("kernel", False), doc
    assert doc["wide"]["forwarding"] == "relay"
    assert str(doc["wide"]["forwarding_reason"]).endswith(
        "need net.ipv4.conf.all.route_localnet=1, which labelproxy cannot set here "
        "(Read-only file system)")
    connect(w, "127.0.0.1", 8701, local=True)
    connect(w, HOST_V4, 8702)
    assert (w.peers(own), w.peers(wide)) == (["127.0.0.1"], ["127.0.0.1"])
    assert w.kernel_routes() == ["tcp://127.0.0.1:8701 own"]
    assert "forwarding: nftables usable here" in logs().decode()
    proxy.stop(timeout=20)
    assert proxy.wait(timeout=30)["StatusCode"] == 0
    assert w.kernel_routes() == []  # a clean stop removed the table
