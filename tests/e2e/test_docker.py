"""End to end on a real (private) Docker engine: labelled containers become live routes.

Containers use host networking and serve on loopback; labelproxy runs as a real process and
is driven only through what a user sees: ports that accept or refuse, bytes that echo,
/routes and /metrics.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.lp import (
    LabelproxyProcess,
    UdpEcho,
    accepts,
    echo_roundtrip,
    free_port,
    labelproxy,
    recv_exact,
    wait_for,
)

pytestmark = pytest.mark.docker

Run = Callable[..., Any]


@pytest.fixture
def run(dockerd: Any, busybox_image: str) -> Iterator[Run]:
    """Start a host-network busybox container; every one is removed after the test."""
    client = dockerd.client()
    made: list[Any] = []

    def start(labels: dict[str, str], command: list[str] | None = None, **kw: Any) -> Any:
        container = client.containers.run(
            busybox_image,
            command or ["sleep", "600"],
            detach=True,
            init=True,
            network_mode="host",
            labels=labels,
            **kw,
        )
        made.append(container)
        return container

    yield start
    for container in made:
        with contextlib.suppress(Exception):  # already gone
            container.remove(force=True)


@pytest.fixture
def lp(dockerd: Any) -> Iterator[LabelproxyProcess]:
    with labelproxy({"LABELPROXY_DOCKER_HOST": dockerd.host}) as proc:
        yield proc


def echo_cmd(port: int) -> list[str]:
    return ["nc", "-ll", "-p", str(port), "-e", "cat"]


def echoes(port: int, payload: bytes = b"ping") -> bool:
    try:
        return echo_roundtrip(port, payload) == payload
    except OSError:
        return False


def test_tcp_route_follows_the_container(lp: LabelproxyProcess, run: Run) -> None:
    listen, target = free_port(), free_port()
    container = run(
        {"proxy.echo.port": f"{listen}:{target}", "proxy.echo.bind": "127.0.0.1"},
        echo_cmd(target),
    )
    wait_for(lambda: echoes(listen), what="bytes echo through the route")
    route = lp.route("echo")
    assert route is not None and route["state"] == "up"
    assert route["backends"][0]["address"] == f"127.0.0.1:{target}"

    container.stop(timeout=2)
    wait_for(lambda: not accepts(listen), what="port closed after docker stop")
    assert lp.route("echo") is None

    container.start()
    wait_for(lambda: echoes(listen), what="port open again after docker start")


def test_udp_route_relays_largest_datagram(lp: LabelproxyProcess, run: Run) -> None:
    echo = UdpEcho()
    listen = free_port(socket.SOCK_DGRAM)
    try:
        run({"proxy.dns.port": f"{listen}:{echo.port}", "proxy.dns.scheme": "udp4",
             "proxy.dns.bind": "127.0.0.1"})
        wait_for(lambda: (lp.route("dns") or {}).get("state") == "up", what="udp route up")
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        client.settimeout(5)
        for size in (1, 512, 1472, 65_000, 65_507):
            payload = bytes([size % 251]) * size
            client.sendto(payload, ("127.0.0.1", listen))
            data, _ = client.recvfrom(70_000)
            assert data == payload, f"datagram of {size} bytes came back as {len(data)}"
        client.close()
        ids = {"route": "dns", "listen": f"udp://127.0.0.1:{listen}"}
        assert lp.metric("labelproxy_udp_datagrams_total", **ids, direction="in") == 5
        assert lp.metric("labelproxy_udp_sessions_active", **ids) == 1
    finally:
        echo.close()


def test_conflict_first_container_keeps_the_port(lp: LabelproxyProcess, run: Run) -> None:
    listen, first_target, second_target = free_port(), free_port(), free_port()
    run({"proxy.first.port": f"{listen}:{first_target}", "proxy.first.bind": "127.0.0.1"},
        echo_cmd(first_target), name="holder")
    wait_for(lambda: echoes(listen), what="first route up")
    run({"proxy.second.port": f"{listen}:{second_target}", "proxy.second.bind": "127.0.0.1"},
        name="latecomer")

    def conflict() -> dict[str, Any] | None:
        for p in lp.routes()["problems"]:
            if p["kind"] == "conflict":
                return dict(p)
        return None

    problem = wait_for(conflict, what="conflict reported")
    assert problem["route"] == "second"
    assert "holder" in problem["text"] and "first" in problem["text"]
    assert lp.metric("labelproxy_route_errors", route="second",
                     listen=f"tcp://127.0.0.1:{listen}", reason="conflict") == 1
    route = lp.route("first")
    assert route is not None and route["backends"][0]["address"] == f"127.0.0.1:{first_target}"
    assert echoes(listen)


def test_two_standalone_containers_on_one_port_conflict(lp: LabelproxyProcess, run: Run) -> None:
    """Containers without a compose or swarm service are not replicas: the first created
    keeps the route and its one backend, the second is in conflict naming it."""
    listen, db_target, debug_target = free_port(), free_port(), free_port()

    def labels(target: int) -> dict[str, str]:
        return {"proxy.db.port": f"{listen}:{target}", "proxy.db.bind": "127.0.0.1"}

    run(labels(db_target), ["nc", "-ll", "-p", str(db_target), "-e", "echo", "db"], name="db")
    wait_for(lambda: len((lp.route("db") or {}).get("backends", [])) == 1, what="db route up")
    run(labels(debug_target), ["nc", "-ll", "-p", str(debug_target), "-e", "echo", "debug"],
        name="debug")

    def conflict() -> dict[str, Any] | None:
        for p in lp.routes()["problems"]:
            if p["kind"] == "conflict" and p["source"] == "debug":
                return dict(p)
        return None

    problem = wait_for(conflict, what="the second standalone container in conflict")
    assert problem["route"] == "db" and "container db" in problem["text"]
    route = lp.route("db")
    assert route is not None
    assert [b["address"] for b in route["backends"]] == [f"127.0.0.1:{db_target}"]

    def answer() -> bytes:
        with socket.create_connection(("127.0.0.1", listen), timeout=5) as s:
            return s.recv(100).strip()

    assert {wait_for(answer, what="the route answers") for _ in range(6)} == {b"db"}


def test_bad_label_is_visible_and_contained(lp: LabelproxyProcess, run: Run) -> None:
    listen, target = free_port(), free_port()
    run({"proxy.good.port": f"{listen}:{target}", "proxy.good.bind": "127.0.0.1",
         "proxy.bad.port": "not-a-port"}, echo_cmd(target), name="mixed")
    wait_for(lambda: echoes(listen), what="good route works")
    problems = [p for p in lp.routes()["problems"] if p["kind"] == "label"]
    assert problems, "the bad label is reported"
    text = problems[0]["text"]
    assert "mixed" in text and "proxy.bad.port" in text and "not-a-port" in text
    assert lp.metric("labelproxy_route_errors", route="bad", listen="", reason="label") == 1
    logged = [line for line in lp.log().splitlines() if "route problem (label)" in line]
    assert len(logged) == 1 and "proxy.bad.port" in logged[0], logged  # once, not every pass


def test_one_alias_in_two_projects_is_two_routes(lp: LabelproxyProcess, run: Run) -> None:
    """The `ssh` of two compose projects, on two ports, are two routes: each has its own
    route_up, counters and errors (before, one `route="ssh"` set counted both), and a third
    container's broken `ssh` label is an error of neither of them."""
    ports = {"shop": (free_port(), free_port()), "blog": (free_port(), free_port())}
    for project, (listen, target) in ports.items():
        run({"com.docker.compose.project": project, "com.docker.compose.service": "ssh",
             "proxy.ssh.port": f"{listen}:{target}", "proxy.ssh.bind": "127.0.0.1"},
            echo_cmd(target), name=f"{project}-ssh-1")
    run({"proxy.ssh.port": "not-a-port"}, name="broken-ssh")
    wait_for(lambda: all(echoes(listen) for listen, _ in ports.values()), what="both ssh")
    shop = {"route": "ssh", "listen": f"tcp://127.0.0.1:{ports['shop'][0]}"}
    blog = {"route": "ssh", "listen": f"tcp://127.0.0.1:{ports['blog'][0]}"}
    shop_before = lp.metric("labelproxy_connections_total", **shop) or 0
    blog_before = lp.metric("labelproxy_connections_total", **blog) or 0
    for _ in range(3):
        assert echoes(ports["shop"][0])
    assert lp.metric("labelproxy_connections_total", **shop) == shop_before + 3
    assert lp.metric("labelproxy_connections_total", **blog) == blog_before
    assert lp.metric("labelproxy_route_up", **shop) == 1
    assert lp.metric("labelproxy_route_up", **blog) == 1
    errors = [x for x in lp.metrics().splitlines() if x.startswith("labelproxy_route_errors{")]
    assert errors == ['labelproxy_route_errors{listen="",reason="label",route="ssh"} 1.0']

    rows = {r["listen"]: r for r in lp.routes()["routes"] if r["route"] == "ssh"}
    assert set(rows) == {shop["listen"], blog["listen"]}
    assert rows[shop["listen"]]["counters"]["connections_total"] == shop_before + 3
    assert rows[blog["listen"]]["counters"]["connections_total"] == blog_before
    table = subprocess.run(
        [sys.executable, "-m", "labelproxy", "routes", "--url", lp.base],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.splitlines()
    shown = sorted(line.split()[1] for line in table if line.split()[:1] == ["ssh"])
    assert shown == sorted([shop["listen"], blog["listen"]])


def test_change_to_other_container_leaves_connection_untouched(
    lp: LabelproxyProcess, run: Run
) -> None:
    listen_a, target_a = free_port(), free_port()
    run({"proxy.a.port": f"{listen_a}:{target_a}", "proxy.a.bind": "127.0.0.1"},
        echo_cmd(target_a))
    wait_for(lambda: echoes(listen_a), what="route a")
    held = socket.create_connection(("127.0.0.1", listen_a), timeout=5)
    held.sendall(b"one")
    assert recv_exact(held, 3) == b"one"

    listen_b, target_b = free_port(), free_port()
    other = run({"proxy.b.port": f"{listen_b}:{target_b}", "proxy.b.bind": "127.0.0.1"},
                echo_cmd(target_b))
    wait_for(lambda: echoes(listen_b), what="route b")
    other.stop(timeout=2)
    wait_for(lambda: not accepts(listen_b), what="route b gone")

    held.sendall(b"two")
    assert recv_exact(held, 3) == b"two"
    held.close()


def test_replicas_share_one_listener_and_unhealthy_ones_get_no_traffic(
    lp: LabelproxyProcess, run: Run
) -> None:
    listen = free_port()
    compose = {"com.docker.compose.project": "demo", "com.docker.compose.service": "web"}
    targets = [free_port(), free_port()]
    for i, target in enumerate(targets):
        run({**compose, "proxy.web.port": f"{listen}:{target}", "proxy.web.bind": "127.0.0.1"},
            ["nc", "-ll", "-p", str(target), "-e", "echo", f"replica{i}"])
    wait_for(lambda: [b["ready"] for b in (lp.route("web") or {}).get("backends", [])]
             == [True, True], what="two ready backends (their tcp check passed)")  # fmt: skip

    def answer() -> bytes:
        with socket.create_connection(("127.0.0.1", listen), timeout=5) as s:
            return s.recv(100).strip()

    seen = {wait_for(answer, what="a replica answers") for _ in range(6)}
    assert seen == {b"replica0", b"replica1"}, "round robin reaches both replicas"

    sick_target = free_port()
    sick = run(
        {**compose, "proxy.web.port": f"{listen}:{sick_target}", "proxy.web.bind": "127.0.0.1"},
        ["nc", "-ll", "-p", str(sick_target), "-e", "echo", "sick"],
        healthcheck={"test": ["CMD", "false"], "interval": 100_000_000, "retries": 1,
                     "timeout": 1_000_000_000},
    )

    def sick_is_unhealthy() -> bool:
        sick.reload()
        return bool(sick.attrs["State"]["Health"]["Status"] == "unhealthy")

    wait_for(sick_is_unhealthy, what="the third replica's health check fails")
    wait_for(lambda: lp.routes()["docker"]["containers"] == 3, what="labelproxy saw it")
    # starting/unhealthy replicas stay out of the pool
    assert len((lp.route("web") or {})["backends"]) == 2
    answers = {answer() for _ in range(9)}
    assert b"sick" not in answers


def test_engine_restart_reconnects_and_keeps_connections(
    dockerd: Any, lp: LabelproxyProcess, run: Run
) -> None:
    listen, target = free_port(), free_port()
    run({"proxy.keep.port": f"{listen}:{target}", "proxy.keep.bind": "127.0.0.1"},
        echo_cmd(target))
    wait_for(lambda: echoes(listen), what="route up")
    held = socket.create_connection(("127.0.0.1", listen), timeout=10)
    held.sendall(b"before")
    assert recv_exact(held, 6) == b"before"
    events_before = lp.metric("labelproxy_reconcile_total", result="ok") or 0

    dockerd.restart()
    wait_for(lambda: "action=disconnect" in lp.log(), what="disconnect noticed")
    wait_for(lambda: lp.metric("labelproxy_docker_connected") == 1, timeout=30,
             what="reconnected")

    # the unchanged route was not touched: the connection opened before is alive
    held.sendall(b"after")
    assert recv_exact(held, 5) == b"after"
    held.close()
    # and discovery works again: a new container gets its route
    listen2, target2 = free_port(), free_port()
    run({"proxy.fresh.port": f"{listen2}:{target2}", "proxy.fresh.bind": "127.0.0.1"},
        echo_cmd(target2))
    wait_for(lambda: echoes(listen2), what="route of a container started after the restart")
    assert (lp.metric("labelproxy_reconcile_total", result="ok") or 0) > events_before
