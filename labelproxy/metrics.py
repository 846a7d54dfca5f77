"""Prometheus metrics: one `Metrics` object with its own `CollectorRegistry`, passed in.

The data plane updates plain integers on a `RouteCounters` (one per route alias, kept for the
life of the process so counters never go backwards when a listener restarts), and observes the
per-route dial and connection durations into `PlainHistogram`s of the same kind: plain lists
and numbers, no locks (the data plane and the scrape share one event-loop thread). A custom
collector reads both at scrape time, so the hot path pays an attribute increment or a bisect,
not a lock.
Current-state gauges (route_info, route_up, route_errors, active connections and sessions)
come from a `StateProvider` the runtime installs: read from live state, they cannot drift.
Label values are route aliases and fixed reason words, never client addresses.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

PREFIX = "labelproxy_"
Direction = Literal["in", "out"]
RejectReason = Literal["acl", "limit", "no_backend", "proxy_header", "loop"]
DropReason = Literal["acl", "limit", "no_backend", "proxy_header", "upstream_error", "loop"]

REJECT_REASONS: tuple[RejectReason, ...] = ("acl", "limit", "no_backend", "proxy_header", "loop")
DROP_REASONS: tuple[DropReason, ...] = (
    "acl",
    "limit",
    "no_backend",
    "proxy_header",
    "upstream_error",
    "loop",
)
DIAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


class PlainHistogram:
    """A Prometheus histogram the data plane observes into without locks.

    `counts[i]` is the number of observations in `(bounds[i-1], bounds[i]]` (not cumulative);
    the extra last slot counts those above every bound (`+Inf`). Prometheus's `le` is
    inclusive, hence `bisect_left`: a value equal to a bound lands in that bound's bucket.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if not bounds or any(not math.isfinite(b) for b in bounds):
            raise ValueError(f"histogram bounds must be finite and non-empty: {bounds!r}")
        if any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"histogram bounds must increase: {bounds!r}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        """Observations at or below each bound, then the total (the `+Inf` bucket)."""
        return list(accumulate(self.counts))


_go_float: Callable[[float], str] = floatToGoString  # typed alias: the library's is untyped


def _le_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """The `le` label values, formatted as prometheus_client's own `Histogram` formats them."""
    return (*(_go_float(b) for b in bounds), "+Inf")


@dataclass(slots=True)
class RouteCounters:
    """Monotonic per-route counters and histograms, updated by the data plane without locks.

    `connections_active` and `udp_sessions_active` are live values the data plane raises and
    lowers; everything else only grows. `observe_dial` and `observe_connection` are the
    `observe` of `dial_durations` and `connection_durations`, bound once.
    """

    route: str
    dial_durations: PlainHistogram = field(default_factory=lambda: PlainHistogram(DIAL_BUCKETS))
    connection_durations: PlainHistogram = field(
        default_factory=lambda: PlainHistogram(DURATION_BUCKETS)
    )
    observe_dial: Callable[[float], None] = field(init=False, repr=False, compare=False)
    observe_connection: Callable[[float], None] = field(init=False, repr=False, compare=False)
    connections_total: int = 0
    connections_active: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    dial_errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    udp_sessions_active: int = 0
    udp_datagrams_in: int = 0
    udp_datagrams_out: int = 0
    udp_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def __post_init__(self) -> None:
        self.observe_dial = self.dial_durations.observe
        self.observe_connection = self.connection_durations.observe

    def reject(self, reason: RejectReason) -> None:
        self.rejected[reason] += 1

    def drop(self, reason: DropReason, count: int = 1) -> None:
        self.udp_dropped[reason] += count


@dataclass(frozen=True, slots=True)
class RouteState:
    """What the runtime reports about one route at scrape time."""

    route: str
    scheme: str
    listen: str
    targets: str
    up: bool
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    routes: tuple[RouteState, ...] = ()
    errors: tuple[tuple[str, str], ...] = ()  # (route, reason) pairs currently in error
    docker_connected: bool = False


StateProvider = Callable[[], StateSnapshot]


class Metrics:
    """All of labelproxy's metrics, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._routes: dict[str, RouteCounters] = {}
        self._state: StateProvider = StateSnapshot
        self._pinned: StateSnapshot | None = None  # the snapshot of the render in progress
        self._render_lock = threading.Lock()
        self.reconcile_total = Counter(
            PREFIX + "reconcile",
            "Reconcile passes by result (ok or error).",
            ["result"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            PREFIX + "reconcile_duration_seconds",
            "Time to plan and apply one desired state.",
            registry=self.registry,
        )
        self.docker_events_total = Counter(
            PREFIX + "docker_events",
            "Docker engine events received, by action.",
            ["action"],
            registry=self.registry,
        )
        self.reloads_total = Counter(
            PREFIX + "routes_file_reloads",
            "Routes file loads, by result (ok, partial or error).",
            ["result"],
            registry=self.registry,
        )
        self.build_info = Gauge(
            PREFIX + "build_info", "labelproxy version.", ["version"], registry=self.registry
        )
        self.registry.register(_LiveCollector(self))

    def route(self, alias: str) -> RouteCounters:
        """The counters of route `alias`, created on first use and kept afterwards."""
        counters = self._routes.get(alias)
        if counters is None:
            counters = RouteCounters(route=alias)
            self._routes[alias] = counters
        return counters

    def all_routes(self) -> Iterable[RouteCounters]:
        return tuple(self._routes.values())

    def set_state_provider(self, provider: StateProvider) -> None:
        self._state = provider

    def state(self) -> StateSnapshot:
        return self._state()

    def _render_state(self) -> StateSnapshot:
        """What the exposition shows: the snapshot `render` was given, else a fresh one."""
        pinned = self._pinned
        return pinned if pinned is not None else self._state()

    def render(self, state: StateSnapshot | None = None) -> bytes:
        """The Prometheus text exposition of every metric. `state`: a snapshot the caller
        took, so that the text can be written on another thread (a thousand routes take a
        few hundred ms) while the runtime's own structures are only read on theirs."""
        with self._render_lock:
            self._pinned = state
            try:
                return generate_latest(self.registry)
            finally:
                self._pinned = None


class _LiveCollector(Collector):
    """Turns `RouteCounters` and the runtime's `StateSnapshot` into metric families."""

    _DIAL_LE = _le_labels(DIAL_BUCKETS)
    _DURATION_LE = _le_labels(DURATION_BUCKETS)

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        state = self._metrics._render_state()
        info = GaugeMetricFamily(
            PREFIX + "route_info",
            "Configured routes (value 1).",
            labels=["route", "scheme", "listen", "targets"],
        )
        up = GaugeMetricFamily(
            PREFIX + "route_up", "1 when the route's listener is bound.", labels=["route"]
        )
        up_by_route: dict[str, bool] = {}
        limit_by_route: dict[str, int] = {}
        for r in state.routes:
            info.add_metric([r.route, r.scheme, r.listen, r.targets], 1)
            # a port range is one alias with several listeners: up only if all of them are
            up_by_route[r.route] = up_by_route.get(r.route, True) and r.up
            if r.limit is not None:
                limit_by_route[r.route] = r.limit
        for route, is_up in up_by_route.items():
            up.add_metric([route], 1 if is_up else 0)
        limit = GaugeMetricFamily(
            PREFIX + "route_connection_limit",
            "The cap on concurrent TCP connections / UDP sessions of a route, where it has one.",
            labels=["route"],
        )
        for route, value in limit_by_route.items():
            limit.add_metric([route], value)
        errors = GaugeMetricFamily(
            PREFIX + "route_errors",
            "Routes currently in error, by reason (label, conflict, bind, address, loop).",
            labels=["route", "reason"],
        )
        error_counts: dict[tuple[str, str], int] = {}
        for pair in state.errors:
            error_counts[pair] = error_counts.get(pair, 0) + 1
        for (route, reason), count in sorted(error_counts.items()):
            errors.add_metric([route, reason], count)
        connected = GaugeMetricFamily(
            PREFIX + "docker_connected", "1 while the Docker engine's event stream is up."
        )
        connected.add_metric([], 1 if state.docker_connected else 0)

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=labels)

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=labels)

        conns = counter("connections", "TCP connections accepted and relayed.", ["route"])
        active = gauge("connections_active", "TCP connections open now.", ["route"])
        rejected = counter(
            "connections_rejected", "TCP connections refused, by reason.", ["route", "reason"]
        )
        dial_err = counter("upstream_dial_errors", "Failed upstream dials.", ["route"])
        nbytes = counter(
            "bytes",
            "Bytes relayed; in = client to upstream, out = upstream to client.",
            ["route", "direction"],
        )
        sessions = gauge("udp_sessions_active", "UDP sessions open now.", ["route"])
        dgrams = counter("udp_datagrams", "UDP datagrams relayed.", ["route", "direction"])
        dropped = counter(
            "udp_datagrams_dropped", "UDP datagrams dropped, by reason.", ["route", "reason"]
        )
        dial = HistogramMetricFamily(
            PREFIX + "upstream_dial_duration_seconds",
            "Time to connect to an upstream backend.",
            labels=["route"],
        )
        duration = HistogramMetricFamily(
            PREFIX + "connection_duration_seconds",
            "Lifetime of a relayed TCP connection or UDP session.",
            labels=["route"],
        )
        for c in self._metrics.all_routes():
            conns.add_metric([c.route], c.connections_total)
            active.add_metric([c.route], c.connections_active)
            for reason, n in c.rejected.items():
                rejected.add_metric([c.route, reason], n)
            dial_err.add_metric([c.route], c.dial_errors)
            nbytes.add_metric([c.route, "in"], c.bytes_in)
            nbytes.add_metric([c.route, "out"], c.bytes_out)
            sessions.add_metric([c.route], c.udp_sessions_active)
            dgrams.add_metric([c.route, "in"], c.udp_datagrams_in)
            dgrams.add_metric([c.route, "out"], c.udp_datagrams_out)
            for reason, n in c.udp_dropped.items():
                dropped.add_metric([c.route, reason], n)
            for family, le, hist in (
                (dial, self._DIAL_LE, c.dial_durations),
                (duration, self._DURATION_LE, c.connection_durations),
            ):
                family.add_metric(
                    [c.route], list(zip(le, hist.cumulative(), strict=True)), hist.sum
                )
        yield from (info, up, limit, errors, connected, conns, active, rejected, dial_err, nbytes)
        yield from (sessions, dgrams, dropped, dial, duration)
