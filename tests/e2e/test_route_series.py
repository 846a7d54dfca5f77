"""A real labelproxy process (routes file, no engine): the series of removed routes leave
/metrics, and each route exports the metric families of its own transport only."""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.lp import (
    LabelproxyProcess,
    TcpEcho,
    UdpEcho,
    consecutive_free_ports,
    echo_roundtrip,
    free_port,
    labelproxy,
    wait_for,
    write_routes,
)

RANGE = 200


@pytest.fixture
def echo() -> Iterator[TcpEcho]:
    server = TcpEcho()
    yield server
    server.close()


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    server = UdpEcho()
    yield server
    server.close()


def env(routes: Path) -> dict[str, str]:
    return {"LABELPROXY_DOCKER_HOST": "none", "LABELPROXY_ROUTES_FILE": str(routes),
            "LABELPROXY_LOG_LEVEL": "info"}  # fmt: skip


def route(scheme: str, listen: int | str, target: int | str) -> dict[str, object]:
    return {"scheme": scheme, "bind": "127.0.0.1", "port": f"{listen}:{target}",
            "host": "127.0.0.1"}  # fmt: skip


def udp_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(payload, ("127.0.0.1", port))
        return s.recv(65536)


def route_samples(text: str, alias_pattern: str) -> list[str]:
    return [x for x in text.splitlines() if re.search(f'route="{alias_pattern}"', x)]


def reload(lp: LabelproxyProcess, routes: Path, doc: dict[str, dict[str, object]]) -> None:
    write_routes(routes, doc)
    lp.signal(signal.SIGHUP)


def test_removed_routes_leave_no_series_and_the_exposition_shrinks_back(
    tmp_path: Path, echo: TcpEcho, udp_echo: UdpEcho
) -> None:
    """224 routes (a 200-port range, 20 TCP and 4 UDP routes) come and go: afterwards none of
    their series is left and /metrics is back to its size before them (before the fix every
    removed route kept its counters on /metrics for the life of the process). The route that
    stayed kept its counters through the reloads."""
    routes = tmp_path / "routes.yaml"
    keep_port = free_port()
    keep = {"keep": route("tcp4", keep_port, echo.port)}
    write_routes(routes, keep)
    first = consecutive_free_ports(RANGE)
    tcp_ports = [free_port() for _ in range(20)]
    udp_ports = [free_port(socket.SOCK_DGRAM) for _ in range(4)]
    crowd: dict[str, dict[str, object]] = {
        "burst": route("tcp4", f"{first}-{first + RANGE - 1}", f"{first}-{first + RANGE - 1}"),
        **{f"gone-{i}": route("tcp4", port, echo.port) for i, port in enumerate(tcp_ports)},
        **{f"udp-{i}": route("udp4", port, udp_echo.port) for i, port in enumerate(udp_ports)},
    }
    # the range's targets are its own ports on 127.0.0.1: never dialled here
    crowd["burst"]["host"] = "127.0.0.2"
    with labelproxy(env(routes)) as lp:
        assert echo_roundtrip(keep_port, b"k") == b"k"
        baseline = len(lp.metrics())

        reload(lp, routes, {**keep, **crowd})
        wait_for(lambda: len(lp.routes()["routes"]) == 1 + 24 + RANGE
                 and all(r["state"] == "up" for r in lp.routes()["routes"]),
                 what="every route up")  # fmt: skip
        for port in tcp_ports[:5]:
            assert echo_roundtrip(port, b"x") == b"x"
        for port in udp_ports:
            assert udp_roundtrip(port, b"u") == b"u"
        crowded = lp.metrics()
        assert len(route_samples(crowded, "(burst|gone-[0-9]+|udp-[0-9])")) > 224 * 5
        assert len(crowded) > 10 * baseline

        reload(lp, routes, keep)
        wait_for(lambda: not route_samples(lp.metrics(), "(burst|gone-[0-9]+|udp-[0-9])"),
                 what="no series of a removed route")  # fmt: skip
        after = lp.metrics()
        # same series as before: only numbers (reload and reconcile counts) have grown
        assert len(after) <= baseline + 200, (baseline, len(after))
        ids = f'listen="tcp://127.0.0.1:{keep_port}",route="keep"'
        assert f"labelproxy_connections_total{{{ids}}} 1.0" in after.splitlines()
        # the range is one line each way in the log, not one per port
        burst = [x for x in lp.log().splitlines() if "route=burst" in x]
        listen = f"listen=tcp://127.0.0.1:{first}-{first + RANGE - 1}"
        assert [x.split("route=")[0].split("  ", 1)[1].strip() for x in burst] == [
            f"route up ({RANGE} ports)", f"route down ({RANGE} ports)"
        ], burst
        assert all(listen in x for x in burst)


def test_each_route_exports_the_families_of_its_transport(
    tmp_path: Path, echo: TcpEcho, udp_echo: UdpEcho
) -> None:
    """TCP routes have no `udp_*` series, UDP routes no connection, rejection or dial series
    (before, every route exported both sets, half of them always 0)."""
    routes = tmp_path / "routes.yaml"
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    write_routes(routes, {"web": route("tcp4", tcp_port, echo.port),
                          "dns": route("udp4", udp_port, udp_echo.port)})  # fmt: skip
    with labelproxy(env(routes)) as lp:
        assert echo_roundtrip(tcp_port, b"t") == b"t"
        assert udp_roundtrip(udp_port, b"u") == b"u"
        text = lp.metrics()

    def families(alias: str) -> set[str]:
        return {re.split(r"[{ ]", x, maxsplit=1)[0] for x in route_samples(text, alias)}

    tcp_only = {
        "labelproxy_connections_total", "labelproxy_connections_active",
        "labelproxy_connections_rejected_total", "labelproxy_upstream_dial_errors_total",
        "labelproxy_upstream_dial_duration_seconds_bucket",
        "labelproxy_upstream_dial_duration_seconds_count",
        "labelproxy_upstream_dial_duration_seconds_sum",
    }  # fmt: skip
    udp_only = {
        "labelproxy_udp_sessions_active", "labelproxy_udp_datagrams_total",
        "labelproxy_udp_datagrams_dropped_total", "labelproxy_route_connection_limit",
    }  # fmt: skip
    shared = {
        "labelproxy_route_info", "labelproxy_route_up", "labelproxy_bytes_total",
        "labelproxy_connection_duration_seconds_bucket",
        "labelproxy_connection_duration_seconds_count",
        "labelproxy_connection_duration_seconds_sum",
    }  # fmt: skip
    # health: every route's backends (1/0) and ejections; check results where it is checked
    health = {"labelproxy_backend_up", "labelproxy_backend_ejections_total"}
    assert families("web") == tcp_only | shared | health | {"labelproxy_health_checks_total"}
    assert families("dns") == udp_only | shared | health  # UDP: no check by default
