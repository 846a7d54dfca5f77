"""Loops and global caps in a real labelproxy process (routes file, no engine), and the UDP
loop in-process: a route that relays into labelproxy's own listener costs one refused
connection (or session), not a chain of thousands; a global cap refuses across routes.

The loops go through a host name that resolves to loopback (`localhost`), so the
desired-state check (IP literals only) cannot see them: the dial-time check must.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labelproxy.settings import auto_limit
from labelproxy.streams.shared import SharedState
from tests.support import udp
from tests.support.lp import (
    LabelproxyProcess,
    TcpEcho,
    echo_roundtrip,
    free_port,
    wait_for,
    write_routes,
)


def loopback_of(name: str) -> tuple[str, str]:
    """(scheme, bind) of a listener that a dial to `name` reaches: its first address."""
    family, _, _, _, addr = socket.getaddrinfo(name, 1, type=socket.SOCK_STREAM)[0]
    return ("tcp6", str(addr[0])) if family == socket.AF_INET6 else ("tcp4", str(addr[0]))


def metric_sum(lp: LabelproxyProcess, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (other labels, such as
    `listen`, may be there too)."""
    total = 0.0
    for line in lp.metrics().splitlines():
        if line.startswith("#") or not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def closed_without_data(sock: socket.socket, *, want: int = 0) -> bool:
    """True when the peer closes (or resets: our bytes were left unread) before any byte;
    with `want`, False as soon as that many bytes came (the connection is served)."""
    got = b""
    try:
        while not want or len(got) < want:
            data = sock.recv(65536)
            if not data:
                break
            got += data
    except ConnectionResetError:
        pass
    return got == b""


@pytest.fixture
def process(tmp_path: Path) -> Iterator[Any]:
    """Start labelproxy on a routes file (descriptors capped at 1,024: a runaway loop stays
    small); stopped by PID after the test."""
    started: list[LabelproxyProcess] = []

    def start(routes: dict[str, dict[str, Any]], **env: str) -> LabelproxyProcess:
        path = tmp_path / "routes.yaml"
        write_routes(path, routes)
        lp = LabelproxyProcess(
            {"LABELPROXY_DOCKER_HOST": "none", "LABELPROXY_ROUTES_FILE": str(path), **env},
            max_open_files=1024,
        )
        started.append(lp)
        lp.wait_ready()
        return lp

    yield start
    for lp in started:
        lp.stop()


def test_a_loop_through_a_host_name_costs_one_connection(process: Any) -> None:
    scheme, bind = loopback_of("localhost")
    port_a, port_b = free_port(), free_port()
    # no health check: its connects would go around the loop too
    route = {"scheme": scheme, "bind": bind, "host": "localhost", "healthcheck": "none"}
    lp = process({"a": {**route, "port": f"{port_a}:{port_b}"},
                  "b": {**route, "port": f"{port_b}:{port_a}"}})  # fmt: skip
    with socket.create_connection((bind, port_a), timeout=5.0) as client:
        client.sendall(b"who is there?")
        assert closed_without_data(client)  # not relayed around until descriptors run out
    wait_for(
        lambda: metric_sum(lp, "labelproxy_connections_rejected_total", route="a", reason="loop"),
        what="the loop refused on route a",
    )
    assert metric_sum(lp, "labelproxy_connections_rejected_total", reason="loop") == 1
    assert metric_sum(lp, "labelproxy_connections_total", route="a") == 1
    assert metric_sum(lp, "labelproxy_connections_total", route="b") == 0
    assert metric_sum(lp, "labelproxy_connections_active") == 0
    assert metric_sum(lp, "labelproxy_upstream_dial_errors_total") == 0
    assert "labelproxy's own listener" in lp.log()


def test_the_global_connection_cap_refuses_across_routes(process: Any) -> None:
    echo = TcpEcho()
    try:
        port_a, port_b = free_port(), free_port()
        route = {"scheme": "tcp4", "bind": "127.0.0.1", "host": "127.0.0.1"}
        lp = process({"a": {**route, "port": f"{port_a}:{echo.port}"},
                      "b": {**route, "port": f"{port_b}:{echo.port}"}},
                     LABELPROXY_MAX_CONNECTIONS="1")  # fmt: skip
        with socket.create_connection(("127.0.0.1", port_a), timeout=5.0) as held:
            held.sendall(b"first")
            assert held.recv(5) == b"first"
            with socket.create_connection(("127.0.0.1", port_b), timeout=5.0) as extra:
                assert closed_without_data(extra)  # refused
            held.sendall(b"still")
            assert held.recv(5) == b"still"
        assert metric_sum(lp, "labelproxy_connections_rejected_total", route="b",
                          reason="limit") == 1  # fmt: skip
        assert "global limit of 1 TCP connections reached" in lp.log()
        wait_for(lambda: echo_roundtrip(port_b, b"free again") == b"free again",
                 what="route b served once the slot is free")  # fmt: skip
    finally:
        echo.close()


def test_the_automatic_cap_keeps_descriptors_for_the_control_plane(tmp_path: Path) -> None:
    """RLIMIT_NOFILE 64 and 40 clients: the `auto` cap (8 here) admits what the descriptors
    allow with room to spare, refuses the rest as `limit`; no accept ever fails with
    EMFILE and /metrics keeps answering (it needs descriptors too)."""
    echo = TcpEcho()
    port = free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"a": {"scheme": "tcp4", "bind": "127.0.0.1", "host": "127.0.0.1",
                                "port": f"{port}:{echo.port}"}})  # fmt: skip
    env = {"LABELPROXY_DOCKER_HOST": "none", "LABELPROXY_ROUTES_FILE": str(routes)}
    lp = LabelproxyProcess(env, max_open_files=64)
    held: list[socket.socket] = []
    try:
        lp.wait_ready()
        for i in range(40):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5.0)
            held.append(conn)
            conn.sendall(b"%02d" % i)
        served = [conn for conn in held if not closed_without_data(conn, want=2)]
        assert len(served) == auto_limit(64) == 8
        assert metric_sum(lp, "labelproxy_connections_rejected_total", reason="limit") == 32
        assert "global limit of 8 TCP connections reached" in lp.log()
        assert "Too many open files" not in lp.log()
    finally:
        for conn in held:
            conn.close()
        lp.stop()
        echo.close()


@pytest.mark.anyio
@pytest.mark.parametrize("path", udp.RELAY_PATHS)
async def test_a_udp_loop_through_a_host_name_is_dropped(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    udp.use_relay_path(monkeypatch, path)
    shared = SharedState(max_connections=None, udp_max_sessions_total=None)
    port_a, port_b = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    spec_a = udp.udp_spec(port_b, backend_host="localhost", port=port_a)
    spec_b = udp.udp_spec(port_a, backend_host="localhost", port=port_b)
    async with (
        udp.running_route(spec_a, shared=shared) as a,
        udp.running_route(spec_b, shared=shared) as b,
        udp.client_of(a) as client,
    ):
        await client.send(b"round and round")
        await udp.wait_until(lambda: a.counters.udp_dropped["loop"] == 1)
        assert a.counters.udp_sessions_active == 0
        assert (b.counters.udp_datagrams_in, b.counters.udp_sessions_active) == (0, 0)


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": True})


def test_a_health_check_does_not_go_round_a_loop(process: Any) -> None:
    """With the default check on, the same loop: the checks of a's backend (b's listener)
    and b's (a's) are not dialled, the backends say why, and no listener sees a check."""
    scheme, bind = loopback_of("localhost")
    port_a, port_b = free_port(), free_port()
    route = {"scheme": scheme, "bind": bind, "host": "localhost",
             "healthcheck.interval": "0.2s", "connect_timeout": "0.3s"}
    lp = process({"a": {**route, "port": f"{port_a}:{port_b}"},
                  "b": {**route, "port": f"{port_b}:{port_a}"}})  # fmt: skip

    def backend(alias: str) -> dict[str, Any]:
        doc = lp.route(alias)
        assert doc is not None
        found: dict[str, Any] = doc["backends"][0]
        return found

    wait_for(lambda: metric_sum(lp, "labelproxy_health_checks_total", result="fail") >= 6,
             what="three checks of each route")  # fmt: skip
    for alias, other in (("a", port_b), ("b", port_a)):
        state = backend(alias)
        assert state["ready"] is False, state
        assert state["last_error"].startswith(
            f"loop: localhost:{other} is labelproxy's own listener"), state
    assert metric_sum(lp, "labelproxy_connections_total") == 0  # no check reached a listener
    assert metric_sum(lp, "labelproxy_health_checks_total", result="pass") == 0
    # a client: no ready backend, so refused after connect_timeout, and nothing dialled
    with socket.create_connection((bind, port_a), timeout=5.0) as client:
        assert closed_without_data(client)
    assert metric_sum(lp, "labelproxy_connections_rejected_total", route="a",
                      reason="no_backend") == 1
    assert metric_sum(lp, "labelproxy_connections_total", route="b") == 0
