"""Routes-file reloads with a real labelproxy process: an edit that breaks one route keeps
that route's last good version serving (reported on /routes, in the log and as
`routes_file_reloads_total{result="partial"}`); a route removed on purpose goes; what the log
says at start-up and on SIGHUP is true."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.lp import (
    LabelproxyProcess,
    TcpEcho,
    accepts,
    echo_roundtrip,
    free_port,
    labelproxy,
    recv_exact,
    wait_for,
    write_routes,
)

RELOADS = "labelproxy_routes_file_reloads_total"


@pytest.fixture
def echo() -> Iterator[TcpEcho]:
    server = TcpEcho()
    yield server
    server.close()


def tcp_route(port: int, upstream: int, **extra: object) -> dict[str, object]:
    return {"scheme": "tcp4", "bind": "127.0.0.1", "port": f"{port}:{upstream}",
            "host": "127.0.0.1", **extra}  # fmt: skip


def static_env(routes_file: Path) -> dict[str, str]:
    return {"LABELPROXY_DOCKER_HOST": "none", "LABELPROXY_ROUTES_FILE": str(routes_file)}


def reloads(lp: LabelproxyProcess, result: str) -> float:
    return lp.metric(RELOADS, result=result) or 0.0


def problems_of(lp: LabelproxyProcess, route: str) -> list[dict[str, Any]]:
    return [p for p in lp.routes()["problems"] if p["route"] == route]


def test_broken_edit_keeps_the_routes_last_good_version_until_fixed(
    tmp_path: Path, echo: TcpEcho
) -> None:
    port_a, port_b = free_port(), free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"a": tcp_route(port_a, echo.port), "b": tcp_route(port_b, echo.port)})
    with labelproxy(static_env(routes)) as lp:
        assert reloads(lp, "ok") == 1
        held = socket.create_connection(("127.0.0.1", port_a), timeout=5)
        with held:
            held.sendall(b"before")
            assert recv_exact(held, 6) == b"before"

            # a typo in a: a is kept as it was, b is still applied as written (removed here)
            write_routes(routes, {"a": tcp_route(port_a, echo.port, scheme="udpp")})
            lp.signal(signal.SIGHUP)
            wait_for(lambda: reloads(lp, "partial") == 1, what="partial reload counted")
            wait_for(lambda: not accepts(port_b), what="route b, removed from the file, gone")
            assert echo_roundtrip(port_a, b"new connection") == b"new connection"
            held.sendall(b"during")
            assert recv_exact(held, 6) == b"during"
            [problem] = problems_of(lp, "a")
            assert problem["label"] == "routes.a.scheme" and problem["value"] == "udpp"
            assert "still serving its last good version" in problem["text"]
            route = lp.route("a")
            assert route is not None and route["state"] == "up" and route["scheme"] == "tcp4"
            log = lp.log()
            assert "routes.a.scheme='udpp'" in log
            assert "kept the last good version of: a" in log

            # broken again (another field): still the last good version, not nothing
            write_routes(routes, {"a": tcp_route(port_a, echo.port, idle_timeout="nan")})
            lp.signal(signal.SIGHUP)
            wait_for(lambda: reloads(lp, "partial") == 2, what="second partial reload")
            assert [p["label"] for p in problems_of(lp, "a")] == ["routes.a.idle_timeout"]
            assert echo_roundtrip(port_a, b"still") == b"still"

            # fixed: the problem is gone, the result is ok, the connection lived through it all
            write_routes(routes, {"a": tcp_route(port_a, echo.port)})
            lp.signal(signal.SIGHUP)
            wait_for(lambda: reloads(lp, "ok") == 2, what="ok reload counted")
            wait_for(lambda: not problems_of(lp, "a"), what="problem cleared on /routes")
            held.sendall(b"after")
            assert recv_exact(held, 5) == b"after"


def test_new_broken_route_is_not_served_and_removed_route_goes(
    tmp_path: Path, echo: TcpEcho
) -> None:
    port_a, port_new = free_port(), free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"a": tcp_route(port_a, echo.port)})
    with labelproxy(static_env(routes)) as lp:
        write_routes(routes, {"a": tcp_route(port_a, echo.port),
                              "new": tcp_route(port_new, echo.port, scheme="udpp")})  # fmt: skip
        lp.signal(signal.SIGHUP)
        wait_for(lambda: reloads(lp, "partial") == 1, what="partial reload counted")
        assert not accepts(port_new)
        [problem] = problems_of(lp, "new")
        assert "last good version" not in problem["text"]  # it never had one
        write_routes(routes, {})
        lp.signal(signal.SIGHUP)
        wait_for(lambda: not accepts(port_a), what="route a removed from the file")
        assert reloads(lp, "ok") == 2
        assert lp.routes()["problems"] == []


def test_missing_routes_file_at_startup_says_what_is_true(tmp_path: Path, echo: TcpEcho) -> None:
    routes = tmp_path / "routes.yaml"
    with labelproxy(static_env(routes)) as lp:
        assert reloads(lp, "error") == 1
        log = lp.log()
        assert "keeping the previous" not in log
        assert f"no static routes until it loads (it is watched for changes): cannot read " \
               f"routes file {routes}: No such file or directory" in log  # fmt: skip
        port = free_port()
        write_routes(routes, {"a": tcp_route(port, echo.port)})
        wait_for(lambda: accepts(port), what="route of the file that appeared")
        routes.unlink()
        wait_for(lambda: reloads(lp, "error") == 2, what="failed reload of the deleted file")
        assert "keeping the previous 1 static routes" in lp.log()
        assert accepts(port)


def test_sighup_without_a_routes_file_does_not_claim_a_reload() -> None:
    with labelproxy({"LABELPROXY_DOCKER_HOST": "none"}) as lp:
        lp.signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP" in lp.log(), what="SIGHUP logged")
        log = lp.log()
        assert "SIGHUP: no routes file to reload (LABELPROXY_ROUTES_FILE is not set)" in log
        assert "reloading" not in log
        assert lp.metric(RELOADS, result="ok") is None
