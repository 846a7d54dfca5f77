"""The series of kernel routes in `Metrics` (pure: kernel counts come from a reader the test
gives, as the runtime's `Forwarding.read_counters` would at scrape time)."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from labelproxy.kernel.engine import RouteCounters as KernelCounters
from labelproxy.metrics import KernelCounts, Metrics, RouteState, StateSnapshot
from labelproxy.spec import ListenKey

WEB = ListenKey("tcp", "::", 80)
DNS = ListenKey("udp", "0.0.0.0", 53)
RELAYED = ListenKey("tcp", "::", 81)
RELAY_ONLY = (
    "labelproxy_bytes_total", "labelproxy_upstream_dial_errors_total",
    "labelproxy_upstream_dial_duration_seconds_count",
    "labelproxy_connection_duration_seconds_count",
)  # fmt: skip


STATE = StateSnapshot(routes=(
    RouteState("web", "tcp", str(WEB), "127.0.0.1:8080", up=True, forwarding="kernel"),
    RouteState("dns", "udp4", str(DNS), "127.0.0.1:5353", up=True, forwarding="kernel"),
    RouteState("rel", "tcp", str(RELAYED), "127.0.0.1:8081", up=True),
))  # fmt: skip


def exposition(metrics: Metrics, state: StateSnapshot = STATE) -> dict[str, float]:
    """`name{labels}` -> value of every sample, the state gauges from `state`."""
    found = {}
    for line in metrics.render(state).decode().splitlines():
        if not line.startswith("#"):
            head, _, number = line.rpartition(" ")
            found[head] = float(number)
    return found


def sample(name: str, key: ListenKey, route: str, **extra: str) -> str:
    labels = {"listen": str(key), "route": route, **extra}
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def setup(reader_counts: Mapping[str, KernelCounts] | None) -> tuple[Metrics, list[int]]:
    metrics = Metrics()
    web, dns, relayed = (metrics.route("web", WEB), metrics.route("dns", DNS),
                         metrics.route("rel", RELAYED))
    # the relay's share of the kernel routes (clients the kernel does not carry)
    web.connections_total, web.connections_active, web.bytes_in = 1, 1, 500
    web.rejected["acl"] = 2
    dns.udp_datagrams_in, dns.udp_sessions_active = 4, 1
    relayed.connections_total, relayed.bytes_in = 7, 700
    calls: list[int] = []

    def reader(listens: Collection[str]) -> Mapping[str, KernelCounts]:
        calls.append(len(listens))
        if reader_counts is None:
            raise OSError("nft: no such table")
        return reader_counts

    metrics.set_kernel_reader(reader)
    return metrics, calls


def test_kernel_routes_add_the_kernel_counts_and_drop_the_relay_only_series() -> None:
    metrics, calls = setup({
        str(WEB): KernelCounters(connections=10, active=3, packets_in=40, bytes_in=4000,
                                 packets_out=30, bytes_out=9000,
                                 rejected={"acl": 5, "limit": 1, "no_backend": 0}),
        str(DNS): KernelCounters(connections=2, active=2, packets_in=6, bytes_in=600,
                                 packets_out=5, bytes_out=500,
                                 rejected={"acl": 3, "limit": 0, "no_backend": 1}),
    })  # fmt: skip
    got = exposition(metrics)
    assert calls == [2]  # one read per scrape, for the two kernel routes
    assert got[sample("labelproxy_route_info", WEB, "web", scheme="tcp",
                      targets="127.0.0.1:8080", forwarding="kernel")] == 1
    assert got[sample("labelproxy_connections_total", WEB, "web")] == 11
    assert got[sample("labelproxy_connections_active", WEB, "web")] == 4
    assert got[sample("labelproxy_connections_rejected_total", WEB, "web", reason="acl")] == 7
    assert got[sample("labelproxy_connections_rejected_total", WEB, "web", reason="limit")] == 1
    assert got[sample("labelproxy_ip_bytes_total", WEB, "web", direction="out")] == 9000
    assert got[sample("labelproxy_ip_packets_total", WEB, "web", direction="in")] == 40
    assert got[sample("labelproxy_udp_datagrams_total", DNS, "dns", direction="in")] == 10
    assert got[sample("labelproxy_udp_sessions_active", DNS, "dns")] == 3
    assert got[sample("labelproxy_udp_datagrams_dropped_total", DNS, "dns",
                      reason="no_backend")] == 1
    for name in RELAY_ONLY:
        assert not any(s.startswith(name + "{") and str(WEB) in s for s in got), name
    # a relay route keeps its own series, and has no kernel ones
    assert got[sample("labelproxy_bytes_total", RELAYED, "rel", direction="in")] == 700
    assert not any(s.startswith("labelproxy_ip_bytes_total{") and str(RELAYED) in s
                   for s in got)  # fmt: skip


def test_an_unreadable_kernel_leaves_the_kernel_routes_counters_out_of_that_scrape() -> None:
    metrics, calls = setup(None)
    got = exposition(metrics)
    assert calls == [1 + 1]
    assert sample("labelproxy_connections_total", WEB, "web") not in got
    assert not any(re.search(r'listen="udp://0\.0\.0\.0:53"', s) and "datagrams" in s
                   for s in got)  # fmt: skip
    assert got[sample("labelproxy_connections_total", RELAYED, "rel")] == 7  # the rest stays
    assert got[sample("labelproxy_route_up", WEB, "web")] == 1


def test_no_kernel_route_no_kernel_read() -> None:
    metrics = Metrics()
    metrics.route("rel", RELAYED)
    relay_only = StateSnapshot(routes=(
        RouteState("rel", "tcp", str(RELAYED), "127.0.0.1:8081", up=True),))
    calls: list[int] = []
    metrics.set_kernel_reader(lambda listens: calls.append(1) or {})  # type: ignore[func-returns-value]
    exposition(metrics, relay_only)
    assert calls == []
