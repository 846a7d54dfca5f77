"""Per-route series of `Metrics`: a route is its listen key (`route` and `listen` labels), each
route exports the families of its transport only, and `forget` drops a route's series."""

from __future__ import annotations

import re

from labelproxy.metrics import Metrics, RouteState, StateSnapshot
from labelproxy.spec import ListenKey

SSH_A = ListenKey("tcp", "::", 2222)
SSH_B = ListenKey("tcp", "::", 2223)
DNS = ListenKey("udp", "0.0.0.0", 53)
TCP_ONLY = (
    "labelproxy_connections_total", "labelproxy_connections_active",
    "labelproxy_connections_rejected_total", "labelproxy_upstream_dial_errors_total",
    "labelproxy_upstream_dial_duration_seconds_bucket",
)  # fmt: skip
UDP_ONLY = (
    "labelproxy_udp_sessions_active", "labelproxy_udp_datagrams_total",
    "labelproxy_udp_datagrams_dropped_total",
)  # fmt: skip
BOTH = ("labelproxy_bytes_total", "labelproxy_connection_duration_seconds_bucket")


def samples(metrics: Metrics) -> dict[str, set[str]]:
    """Sample name -> the `listen` values it has a sample for."""
    out: dict[str, set[str]] = {}
    for line in metrics.render(StateSnapshot()).decode().splitlines():
        if line.startswith("#"):
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        listen = re.search(r'listen="([^"]*)"', line)
        out.setdefault(name, set()).add(listen.group(1) if listen else "")
    return out


def value(
    metrics: Metrics, name: str, state: StateSnapshot | None = None, **labels: str
) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.render(state or StateSnapshot()).decode().splitlines():
        head, _, number = line.rpartition(" ")
        if head == f"{name}{{{want}}}":
            return float(number)
    return None


def test_one_alias_on_two_ports_is_two_routes_with_their_own_series() -> None:
    """The `ssh` of two compose projects: before, one set of series (route="ssh") counted both
    and showed one route_up for the two."""
    metrics = Metrics()
    a, b = metrics.route("ssh", SSH_A), metrics.route("ssh", SSH_B)
    assert a is not b
    a.connections_total = 3
    b.connections_total = 5
    b.dial_errors = 1
    state = StateSnapshot(routes=(
        RouteState("ssh", "tcp", str(SSH_A), "10.0.0.1:22", up=True),
        RouteState("ssh", "tcp", str(SSH_B), "10.0.0.2:22", up=False),
    ))  # fmt: skip
    total = "labelproxy_connections_total"
    assert value(metrics, total, route="ssh", listen="tcp://[::]:2222") == 3
    assert value(metrics, total, route="ssh", listen="tcp://[::]:2223") == 5
    errors = "labelproxy_upstream_dial_errors_total"
    assert value(metrics, errors, route="ssh", listen="tcp://[::]:2222") == 0
    assert value(metrics, errors, route="ssh", listen="tcp://[::]:2223") == 1
    up = "labelproxy_route_up"
    assert value(metrics, up, state, route="ssh", listen="tcp://[::]:2222") == 1
    assert value(metrics, up, state, route="ssh", listen="tcp://[::]:2223") == 0


def test_route_errors_name_the_listen_key_they_are_about() -> None:
    """A label error of a broken container (no listen key: "") is not an error of the healthy
    route with the same alias, and a conflict names the key it lost."""
    metrics = Metrics()
    state = StateSnapshot(
        routes=(RouteState("ssh", "tcp", str(SSH_A), "10.0.0.1:22", up=True),),
        errors=(("ssh", "", "label"), ("ssh", str(SSH_A), "conflict"), ("ssh", "", "label")),
    )
    name = "labelproxy_route_errors"
    assert value(metrics, name, state, route="ssh", listen="", reason="label") == 2
    assert value(metrics, name, state, route="ssh", listen=str(SSH_A), reason="conflict") == 1
    assert value(metrics, name, state, route="ssh", listen=str(SSH_A), reason="label") is None


def test_each_route_exports_only_the_families_of_its_transport() -> None:
    metrics = Metrics()
    metrics.route("ssh", SSH_A)
    metrics.route("dns", DNS)
    found = samples(metrics)
    for name in TCP_ONLY:
        assert found[name] == {str(SSH_A)}, name
    for name in UDP_ONLY:
        assert found[name] == {str(DNS)}, name
    for name in BOTH:
        assert found[name] == {str(SSH_A), str(DNS)}, name


def test_forget_drops_every_series_of_the_route_and_a_return_starts_from_zero() -> None:
    metrics = Metrics()
    keep = metrics.route("ssh", SSH_A)
    keep.bytes_in = 10
    baseline = metrics.render(StateSnapshot())
    gone = metrics.route("ssh", SSH_B)
    gone.bytes_in = 99
    gone.observe_dial(0.01)
    assert str(SSH_B) in metrics.render(StateSnapshot()).decode()
    metrics.forget(SSH_B)
    assert metrics.render(StateSnapshot()) == baseline
    assert metrics.counters(SSH_B) is None
    assert metrics.route("ssh", SSH_B).bytes_in == 0
    assert metrics.route("ssh", SSH_A) is keep


def test_a_new_alias_on_the_same_listen_key_relabels_its_counters() -> None:
    """A listener updated in place to serve another alias keeps counting, under the new name."""
    metrics = Metrics()
    counters = metrics.route("old", SSH_A)
    counters.connections_total = 4
    assert metrics.route("new", SSH_A) is counters
    total = "labelproxy_connections_total"
    assert value(metrics, total, route="new", listen=str(SSH_A)) == 4
    assert value(metrics, total, route="old", listen=str(SSH_A)) is None
