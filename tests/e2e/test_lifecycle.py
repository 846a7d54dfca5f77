"""A real labelproxy process with a routes file and no Docker engine: relaying, metrics,
reloads, bind retries, logs, and the SIGTERM drain."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.lp import (
    LabelproxyProcess,
    TcpEcho,
    accepts,
    consecutive_free_ports,
    echo_roundtrip,
    free_port,
    labelproxy,
    recv_exact,
    wait_for,
    write_routes,
)


@pytest.fixture
def echo() -> Iterator[TcpEcho]:
    server = TcpEcho()
    yield server
    server.close()


def tcp_route(port: int, upstream: int, **extra: object) -> dict[str, object]:
    return {"scheme": "tcp4", "bind": "127.0.0.1", "port": f"{port}:{upstream}",
            "host": "127.0.0.1", **extra}


def static_env(routes_file: Path, **extra: str) -> dict[str, str]:
    return {"LABELPROXY_DOCKER_HOST": "none", "LABELPROXY_ROUTES_FILE": str(routes_file), **extra}


def test_static_route_relays_and_counts(tmp_path: Path, echo: TcpEcho) -> None:
    port = free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"echo": tcp_route(port, echo.port)})
    with labelproxy(static_env(routes)) as lp:
        payload = bytes(range(256)) * 4000  # 1,024,000 bytes
        assert echo_roundtrip(port, payload) == payload
        ids = {"route": "echo", "listen": f"tcp://127.0.0.1:{port}"}
        wait_for(lambda: lp.metric("labelproxy_connections_active", **ids) == 0,
                 what="connection closed in metrics")
        assert lp.metric("labelproxy_bytes_total", **ids, direction="in") == len(payload)
        assert lp.metric("labelproxy_bytes_total", **ids, direction="out") == len(payload)
        assert lp.metric("labelproxy_connections_total", **ids) == 1
        assert lp.metric("labelproxy_route_up", **ids) == 1
        assert lp.metric(
            "labelproxy_route_info", route="echo", scheme="tcp4",
            listen=f"tcp://127.0.0.1:{port}", targets=f"127.0.0.1:{echo.port}",
            forwarding="relay",
        ) == 1
        assert lp.metric("labelproxy_docker_connected") == 0
        route = lp.route("echo")
        assert route is not None and route["state"] == "up"
        assert route["counters"]["bytes_in"] == len(payload)
        assert lp.get("/healthz")[0] == 200


def test_reload_on_sighup_and_on_change_keeps_unchanged_routes(
    tmp_path: Path, echo: TcpEcho
) -> None:
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"a": tcp_route(port_a, echo.port)})
    with labelproxy(static_env(routes)) as lp:
        held = socket.create_connection(("127.0.0.1", port_a), timeout=5)
        held.sendall(b"before")
        assert recv_exact(held, 6) == b"before"

        write_routes(routes, {"a": tcp_route(port_a, echo.port),
                              "b": tcp_route(port_b, echo.port)})
        lp.signal(signal.SIGHUP)
        wait_for(lambda: accepts(port_b), what="route b after SIGHUP")

        # without a signal: the file watcher notices the change
        write_routes(routes, {"a": tcp_route(port_a, echo.port),
                              "c": tcp_route(port_c, echo.port)})
        wait_for(lambda: accepts(port_c) and not accepts(port_b), what="reload on change")

        # the untouched route's connection lived through both reloads
        held.sendall(b"after")
        assert recv_exact(held, 5) == b"after"
        held.close()


def test_broken_routes_file_keeps_previous_routes(tmp_path: Path, echo: TcpEcho) -> None:
    port = free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"a": tcp_route(port, echo.port)})
    with labelproxy(static_env(routes)) as lp:
        routes.write_text("routes: [this is: not, a mapping\n")
        lp.signal(signal.SIGHUP)
        wait_for(lambda: lp.metric("labelproxy_routes_file_reloads_total", result="error"),
                 what="failed reload counted")
        assert accepts(port)
        assert str(routes) in lp.log()


def test_bad_route_is_contained(tmp_path: Path, echo: TcpEcho) -> None:
    good = free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"good": tcp_route(good, echo.port),
                          "bad": tcp_route(free_port(), echo.port, scheme="sctp")})
    with labelproxy(static_env(routes)) as lp:
        assert echo_roundtrip(good, b"fine") == b"fine"
        problems = lp.routes()["problems"]
        assert any("sctp" in p["text"] and "bad" in p["text"] for p in problems), problems
        assert lp.metric("labelproxy_route_errors", route="bad", listen="", reason="label") == 1


def test_bind_failure_is_reported_and_retried(tmp_path: Path, echo: TcpEcho) -> None:
    port = free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen(1)
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"late": tcp_route(port, echo.port)})
    with labelproxy(static_env(routes)) as lp:
        route: dict[str, Any] = wait_for(lambda: lp.route("late"), what="route listed")
        assert route["state"] == "error"
        assert "in use" in " ".join(route["errors"]).lower()
        ids = {"route": "late", "listen": f"tcp://127.0.0.1:{port}"}
        assert lp.metric("labelproxy_route_errors", **ids, reason="bind") == 1
        assert lp.metric("labelproxy_route_up", **ids) == 0
        squatter.close()
        wait_for(lambda: (lp.route("late") or {}).get("state") == "up", timeout=20,
                 what="bind retried")
        assert echo_roundtrip(port, b"x") == b"x"


def test_engine_unreachable_still_serves_static_routes(tmp_path: Path, echo: TcpEcho) -> None:
    port = free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"a": tcp_route(port, echo.port)})
    env = {"LABELPROXY_DOCKER_HOST": f"unix://{tmp_path}/no-such.sock",
           "LABELPROXY_ROUTES_FILE": str(routes)}
    with labelproxy(env, ready=False) as lp:
        wait_for(lambda: accepts(port), what="static route without engine")
        assert lp.get("/healthz")[0] == 200
        assert lp.get("/readyz")[0] == 503
        assert lp.metric("labelproxy_docker_connected") == 0


@contextmanager
def proxy_with_held_connection(
    tmp_path: Path, echo: TcpEcho, *, drain: str
) -> Iterator[tuple[LabelproxyProcess, int, socket.socket]]:
    """A static-route labelproxy with drain timeout `drain` and one live, echoing connection."""
    port = free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"a": tcp_route(port, echo.port)})
    lp = LabelproxyProcess(static_env(routes, LABELPROXY_DRAIN_TIMEOUT=drain))
    try:
        lp.wait_ready()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
            held.sendall(b"ping")
            assert recv_exact(held, 4) == b"ping"
            yield lp, port, held
    finally:
        lp.stop()


def test_sigterm_drains_then_exits_zero(tmp_path: Path, echo: TcpEcho) -> None:
    with proxy_with_held_connection(tmp_path, echo, drain="20s") as (lp, port, held):
        lp.signal(signal.SIGTERM)
        wait_for(lambda: not accepts(port), what="listener closed on SIGTERM")
        held.sendall(b"still here")  # the live connection keeps working while draining
        assert recv_exact(held, 10) == b"still here"
        assert lp.proc.poll() is None
        held.shutdown(socket.SHUT_WR)  # last connection done -> exit without waiting 20 s
        assert held.recv(10) == b""
        assert lp.proc.wait(timeout=10) == 0


def test_drain_deadline_then_exit(tmp_path: Path, echo: TcpEcho) -> None:
    with proxy_with_held_connection(tmp_path, echo, drain="1s") as (lp, _, held):
        lp.signal(signal.SIGTERM)
        assert lp.proc.wait(timeout=15) == 0
        assert held.recv(10) == b""  # the proxy closed it at the deadline


def test_second_sigterm_exits_at_once(tmp_path: Path, echo: TcpEcho) -> None:
    with proxy_with_held_connection(tmp_path, echo, drain="60s") as (lp, port, _):
        lp.signal(signal.SIGTERM)
        wait_for(lambda: not accepts(port), what="draining")
        lp.signal(signal.SIGTERM)
        # well before the 60 s drain deadline, and with the forced-exit status
        assert lp.proc.wait(timeout=10) == 1


def test_json_logs_and_access_log(tmp_path: Path, echo: TcpEcho) -> None:
    port = free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"a": tcp_route(port, echo.port)})
    with labelproxy(static_env(routes, LABELPROXY_LOG_FORMAT="json",
                               LABELPROXY_LOG_LEVEL="info")) as lp:
        assert echo_roundtrip(port, b"hello") == b"hello"

        def access_record() -> dict[str, Any] | None:
            for line in lp.log().splitlines():
                record = json.loads(line)  # every line is one JSON object
                if record.get("logger") == "labelproxy.access":
                    return dict(record)
            return None

        record: dict[str, Any] = wait_for(access_record, what="access log record")
        assert record["route"] == "a"
        assert record["bytes_in"] == 5 and record["bytes_out"] == 5
        assert str(record["client"]).startswith("127.0.0.1")


def test_routes_command_prints_the_table(tmp_path: Path, echo: TcpEcho) -> None:
    port = free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"shown": tcp_route(port, echo.port),
                          "broken": {**tcp_route(free_port(), echo.port), "port": "99999"}})
    with labelproxy(static_env(routes)) as lp:
        assert echo_roundtrip(port, b"abc") == b"abc"
        proc = subprocess.run(
            [sys.executable, "-m", "labelproxy", "routes", "--url", lp.base],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split()[:4] == ["ROUTE", "LISTEN", "SCHEME", "STATE"]
        row = next(line for line in lines if line.startswith("shown"))
        assert f"tcp://127.0.0.1:{port}" in row and " up " in row
        assert f"127.0.0.1:{echo.port}" in row
        assert "PROBLEMS" in proc.stdout and "99999" in proc.stdout
    down = subprocess.run(
        [sys.executable, "-m", "labelproxy", "routes", "--url", lp.base],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert down.returncode == 1 and "cannot read" in down.stderr


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "labelproxy", "--version"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("labelproxy ")


def _echoes_on(conn: socket.socket, payload: bytes) -> bool:
    try:
        conn.sendall(payload)
        return recv_exact(conn, len(payload)) == payload
    except (OSError, AssertionError):
        return False


def test_out_of_file_descriptors_contained_and_recovers(tmp_path: Path, echo: TcpEcho) -> None:
    """Descriptors run out (RLIMIT_NOFILE 64, 40 clients needing two each): connections beyond
    the limit are refused and logged, the ones being served keep working, nothing crashes, and
    once descriptors are free again new connections are served. (The global cap, `auto`,
    would stop short of this: it is set above the descriptors here, as an operator might.)"""
    port = free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"a": tcp_route(port, echo.port)})
    env = static_env(routes, LABELPROXY_MAX_CONNECTIONS="1000")
    lp = LabelproxyProcess(env, max_open_files=64)
    held: list[socket.socket] = []
    try:
        lp.wait_ready()
        for _ in range(40):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.settimeout(0.5)
            held.append(conn)
        working = [conn for conn in held if _echoes_on(conn, b"first")]
        assert 0 < len(working) < len(held), len(working)
        wait_for(lambda: "Too many open files" in lp.log(), what="the failure is logged")
        assert all(_echoes_on(conn, b"still") for conn in working)
        for conn in held:
            conn.close()
        held.clear()
        wait_for(lambda: echo_roundtrip(port, b"again") == b"again", timeout=20,
                 what="serving again after descriptors were freed")
        assert lp.alive() and lp.get("/healthz")[0] == 200
        assert "Traceback" not in lp.log()
    finally:
        for conn in held:
            conn.close()
        lp.stop()


def test_settings_reach_the_data_plane_acl_and_proxy_protocol(
    tmp_path: Path, echo: TcpEcho
) -> None:
    """LABELPROXY_DENY refuses before any dial; LABELPROXY_ACCEPT_PROXY_PROTOCOL with
    LABELPROXY_TRUSTED_PROXIES takes the client address from the header, and the route's
    `proxy_protocol: v1` passes it on to the upstream."""
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(8)
    upstream.settimeout(10)
    denied_port, pp_port = free_port(), free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {
        # no checks: the upstreams count (and take) only what clients send through
        "denied": tcp_route(denied_port, echo.port, deny="127.0.0.0/8", healthcheck="none"),
        "pp": tcp_route(pp_port, upstream.getsockname()[1], proxy_protocol="v1",
                        healthcheck="none"),
    })
    env = static_env(routes, LABELPROXY_ACCEPT_PROXY_PROTOCOL="optional",
                     LABELPROXY_TRUSTED_PROXIES="127.0.0.1")
    with labelproxy(env) as lp, upstream:
        with socket.create_connection(("127.0.0.1", denied_port), timeout=5) as refused:
            refused.sendall(b"x")  # no PROXY header: the socket address is the client
            assert refused.recv(10) == b""  # closed at once
        assert echo.accepted == 0  # no dial happened
        assert lp.metric("labelproxy_connections_rejected_total", route="denied",
                         listen=f"tcp://127.0.0.1:{denied_port}", reason="acl") == 1

        with socket.create_connection(("127.0.0.1", pp_port), timeout=5) as client:
            client.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\nhello")
            conn, _ = upstream.accept()
            with conn:
                conn.settimeout(5)
                received = b""
                while b"hello" not in received:
                    chunk = conn.recv(4096)
                    assert chunk, received
                    received += chunk
        header = received.split(b"\r\n", 1)[0].decode()
        assert header.startswith("PROXY TCP4 203.0.113.7 "), header
        assert received.endswith(b"\r\nhello")


def test_port_range_is_one_route_per_port_in_metrics(tmp_path: Path, echo: TcpEcho) -> None:
    """A range alias has one listener, and one set of series, per port (a route is its listen
    key); UDP routes export their session cap, TCP routes without a cap export none."""
    first = consecutive_free_ports(3)
    dns_port = free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {
        "range": {"scheme": "tcp4", "bind": "127.0.0.1",
                  "port": f"{first}-{first + 2}:{echo.port}-{echo.port + 2}",
                  "host": "127.0.0.1"},
        "dns": {"scheme": "udp4", "bind": "127.0.0.1", "port": f"{dns_port}:53",
                "host": "127.0.0.1"},
    })
    with labelproxy(static_env(routes)) as lp:
        for port in range(first, first + 3):
            assert accepts(port)
        lines = lp.metrics().splitlines()
        assert sorted(x for x in lines if x.startswith("labelproxy_route_up{")
                      and 'route="range"' in x) == [
            f'labelproxy_route_up{{listen="tcp://127.0.0.1:{port}",route="range"}} 1.0'
            for port in range(first, first + 3)
        ]
        assert sum(x.startswith('labelproxy_route_info{') and 'route="range"' in x
                   for x in lines) == 3
        dns = {"route": "dns", "listen": f"udp://127.0.0.1:{dns_port}"}
        assert lp.metric("labelproxy_route_connection_limit", **dns) == 10_000
        assert not [x for x in lines
                    if x.startswith("labelproxy_route_connection_limit{") and "range" in x]
