"""Prometheus metrics: one `Metrics` object with its own `CollectorRegistry`, passed in.

A route is its listen key: every per-route series carries `route` (the alias) and `listen`
(the listen key, `tcp://[::]:2222`), so one alias on two ports (the `ssh` of two compose
projects) is two routes with series of their own. The data plane updates plain integers on a
`RouteCounters` (one per listen key, kept while the route is desired, listening or draining,
so counters do not go backwards when a listener restarts or is updated in place; `forget`
drops them once the route is gone), and observes the per-route dial and connection durations
into `PlainHistogram`s of the same kind: plain lists and numbers, no locks (each counter has
one writer thread). A custom collector reads both at scrape time, so the hot path pays an
attribute increment or a bisect, not a lock. A route exports only the families of its
transport: TCP routes no `udp_*` series, UDP routes no connection, rejection or dial series.
Current-state gauges (route_info, route_up, route_connection_limit, route_errors,
docker_connected) and the health families (backend_up{backend}, health_checks_total{result},
backend_ejections_total, from the health checker) come from the `StateSnapshot` the caller of
`render` passes (the runtime takes it from live state on its event loop, see `status`), so
they cannot drift; metrics never calls back into the runtime.
Label values are route aliases (at most 64 characters of `[A-Za-z0-9_.-]`, see `sources.fields`),
listen keys and fixed reason words, never client addresses.

Routes the kernel forwards (`RouteState.forwarding == "kernel"`) are counted by nftables and
conntrack: a `KernelReader` the runtime installs is called at scrape time, on the thread that
writes the exposition (never the event loop), once per scrape and only when some route is a
kernel route. Their connection, session, datagram and rejection series add the kernel's
counts to the relay's (which carries what the kernel does not: see `labelproxy.kernel`);
`ip_bytes_total` and `ip_packets_total` are theirs alone (IP packets, headers included); the
series only the relay can measure (payload `bytes_total`, dial errors and latency,
connection durations) are absent. When the kernel cannot be read, a kernel route's counter
series are left out of that scrape rather than shown without the kernel's share.

About 320 lines: most of it is the exposition (`_LiveCollector`, one family per metric with its
help text), kept beside the counters it reads so that a new counter and its series change
together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from labelproxy.histogram import PlainHistogram, le_labels
from labelproxy.spec import ListenKey, Transport

logger = logging.getLogger(__name__)

PREFIX = "labelproxy_"
Direction = Literal["in", "out"]
RejectReason = Literal["acl", "limit", "no_backend", "proxy_header", "loop"]
# the refusals of a listener shared by routes chosen by name, before a route is chosen:
# counted on the listener's own series (`Metrics.listener`: `route=""`, `listen` its key)
NameRejectReason = Literal[
    "acl", "limit", "proxy_header", "no_route", "peek_timeout", "peek_invalid"
]
DropReason = Literal["acl", "limit", "no_backend", "proxy_header", "upstream_error", "loop"]

REJECT_REASONS: tuple[RejectReason, ...] = ("acl", "limit", "no_backend", "proxy_header", "loop")
NAME_REJECT_REASONS: tuple[NameRejectReason, ...] = get_args(NameRejectReason)
DROP_REASONS: tuple[DropReason, ...] = (
    "acl",
    "limit",
    "no_backend",
    "proxy_header",
    "upstream_error",
    "loop",
)
ROUTE_LABELS = ("route", "listen")  # the labels of every per-route series
DIAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


@dataclass(slots=True)
class RouteCounters:
    """Monotonic per-route counters and histograms, updated by the data plane without locks.

    One per listen key (`listen`, its text; `transport`, which families it exports); `route`
    is the alias now served there (an in-place update may change it). `connections_active`
    and `udp_sessions_active` are live values the data plane raises and lowers; everything
    else only grows. `observe_dial` and `observe_connection` are the `observe` of
    `dial_durations` and `connection_durations`, bound once.
    """

    route: str
    listen: str = ""
    transport: Transport = "tcp"
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

    def reject(self, reason: RejectReason | NameRejectReason) -> None:
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
    forwarding: str = "relay"  # "kernel" when nftables forwards the route


@dataclass(frozen=True, slots=True)
class HealthState:
    """One route's backend health at scrape time (from the health checker): each backend
    and whether it is in the pool, its active checks' results (`None`: no active check) and
    its passive ejections, both counted since the route appeared."""

    route: str
    listen: str
    backends: tuple[tuple[str, bool], ...]
    results: tuple[tuple[str, int], ...] | None
    ejections: int


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    routes: tuple[RouteState, ...] = ()
    # (route, listen, reason) of each problem now: listen is "" for a problem that is not
    # about one listen key (a label or address error keeps the route from being built)
    errors: tuple[tuple[str, str, str], ...] = ()
    docker_connected: bool = False
    health: tuple[HealthState, ...] = ()




class KernelCounts(Protocol):
    """One kernel route's counters (`labelproxy.kernel.engine.RouteCounters`): flows seen
    (`connections`) and live (`active`), IP packets and bytes each way, refusals by reason."""

    @property
    def connections(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def packets_in(self) -> int: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def packets_out(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def rejected(self) -> Mapping[str, int]: ...


# listen keys (as text) of the kernel routes -> their counters, read now; blocking
KernelReader = Callable[[Collection[str]], Mapping[str, KernelCounts]]


class Metrics:
    """All of labelproxy's metrics, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._routes: dict[ListenKey, RouteCounters] = {}
        self._pinned = StateSnapshot()  # the snapshot of the render in progress
        self._kernel_reader: KernelReader | None = None
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
        # wake on demand (sources.sleeper): per wake, per sleep, clients held meanwhile
        self.wakes_total = Counter(
            PREFIX + "wakes",
            "Container wakes asked for by a route's clients, by result "
            "(ok, timeout, error, refused).",
            ["route", "listen", "result"],
            registry=self.registry,
        )
        self.wake_duration = Histogram(
            PREFIX + "wake_duration_seconds",
            "Time from a wake's first client to a ready backend.",
            buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.sleeps_total = Counter(
            PREFIX + "sleeps",
            "Idle containers put to sleep, by route and stop method.",
            ["route", "listen", "method"],
            registry=self.registry,
        )
        self.held_clients = Gauge(
            PREFIX + "held_clients",
            "Clients held (accepted, not read) while their route's container wakes.",
            ["route", "listen"],
            registry=self.registry,
        )
        self.route_asleep = Gauge(
            PREFIX + "route_asleep",
            "1 while the route's container sleeps (asleep, stopping or waking), 0 while awake.",
            ["route", "listen"],
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(self))

    def route(self, alias: str, key: ListenKey) -> RouteCounters:
        """The counters of the route listening on `key`, created on first use and kept until
        `forget(key)`; their `route` label becomes `alias` (the alias served there now)."""
        counters = self._routes.get(key)
        if counters is None:
            counters = RouteCounters(route=alias, listen=str(key), transport=key.transport)
            self._routes[key] = counters
        elif counters.route != alias:
            counters.route = alias
        return counters

    def listener(self, key: ListenKey) -> RouteCounters:
        """The own counters of a listener shared by routes chosen by name (`key`: its
        socket's, without names): its refusals before a route is chosen. Forget them with
        `forget(key)` once it is closed."""
        counters = self._routes.get(key)
        if counters is None:
            rejected: dict[str, int] = dict.fromkeys(NAME_REJECT_REASONS, 0)
            counters = RouteCounters(route="", listen=str(key), rejected=rejected)
            self._routes[key] = counters
        return counters

    def counters(self, key: ListenKey) -> RouteCounters | None:
        """The counters of the route on `key`, if it has any (read only: creates nothing)."""
        return self._routes.get(key)

    def forget(self, key: ListenKey) -> None:
        """Drop the series of the route on `key`: it is gone (not desired, not listening, not
        draining). Should it come back, its counters start again from zero."""
        self._routes.pop(key, None)
        listen = str(key)
        wake_series: tuple[tuple[Counter | Gauge, tuple[str, ...]], ...] = (
            (self.wakes_total, ("route", "listen", "result")),
            (self.sleeps_total, ("route", "listen", "method")),
            (self.held_clients, ("route", "listen")),
            (self.route_asleep, ("route", "listen")),
        )
        for family, names in wake_series:  # wake on demand's series of this listen key
            seen = {
                tuple(sample.labels[n] for n in names)
                for metric in family.collect()
                for sample in metric.samples
                if sample.labels.get("listen") == listen and all(n in sample.labels for n in names)
            }
            for values in seen:
                family.remove(*values)

    def all_routes(self) -> Iterable[RouteCounters]:
        return tuple(self._routes.values())

    def set_kernel_reader(self, reader: KernelReader) -> None:
        """Where scrapes read the counters of the routes the kernel forwards (blocking)."""
        self._kernel_reader = reader

    def read_kernel(self, listens: Collection[str]) -> Mapping[str, KernelCounts] | None:
        """The kernel counters of the routes on `listens` ({} when there are none), or None
        when they cannot be read now (logged)."""
        reader = self._kernel_reader
        if not listens or reader is None:
            return {}
        try:
            return reader(listens)
        except Exception as exc:  # a scrape must not fail for it: the series are left out
            logger.error("cannot read the kernel's counters: %s", exc,
                         extra={"action": "metrics"})
            return None

    def _render_state(self) -> StateSnapshot:
        """What the exposition shows: the snapshot `render` was given (an empty one when the
        registry is collected some other way)."""
        return self._pinned

    def render(self, state: StateSnapshot) -> bytes:
        """The Prometheus text exposition of every metric, the current-state gauges from
        `state`: a snapshot the caller took, so that the text can be written on another thread
        (a thousand routes take a few hundred ms) while the runtime's own structures are only
        read on theirs."""
        with self._render_lock:
            self._pinned = state
            try:
                return generate_latest(self.registry)
            finally:
                self._pinned = StateSnapshot()


@dataclass(frozen=True, slots=True)
class MetricsDocument:
    """A /metrics response as taken on the event loop: the state gauges' snapshot. `encode`
    writes the exposition (the counters as they are then) and may run on any thread."""

    metrics: Metrics
    state: StateSnapshot

    def encode(self) -> bytes:
        return self.metrics.render(self.state)


class _LiveCollector(Collector):
    """Turns `RouteCounters` and the runtime's `StateSnapshot` into metric families."""

    _DIAL_LE = le_labels(DIAL_BUCKETS)
    _DURATION_LE = le_labels(DURATION_BUCKETS)

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        state = self._metrics._render_state()
        yield from self._state_families(state)
        kernel_routes = {r.listen for r in state.routes if r.forwarding == "kernel"}
        kernel = self._metrics.read_kernel(kernel_routes)
        yield from self._counter_families(self._metrics.all_routes(), kernel_routes, kernel)

    def _state_families(self, state: StateSnapshot) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            PREFIX + "route_info",
            "Configured routes (value 1); forwarding is kernel (nftables) or relay.",
            labels=["route", "scheme", "listen", "targets", "forwarding"],
        )
        up = GaugeMetricFamily(
            PREFIX + "route_up", "1 when the route's listener is bound.", labels=ROUTE_LABELS
        )
        limit = GaugeMetricFamily(
            PREFIX + "route_connection_limit",
            "The cap on concurrent TCP connections / UDP sessions of a route, where it has one.",
            labels=ROUTE_LABELS,
        )
        for r in state.routes:
            info.add_metric([r.route, r.scheme, r.listen, r.targets, r.forwarding], 1)
            up.add_metric([r.route, r.listen], 1 if r.up else 0)
            if r.limit is not None:
                limit.add_metric([r.route, r.listen], r.limit)
        errors = GaugeMetricFamily(
            PREFIX + "route_errors",
            "Route problems now, by reason (label, conflict, bind, address, loop); listen is "
            "empty for a problem that is not about one listen key.",
            labels=[*ROUTE_LABELS, "reason"],
        )
        error_counts: dict[tuple[str, str, str], int] = {}
        for triple in state.errors:
            error_counts[triple] = error_counts.get(triple, 0) + 1
        for (route, listen, reason), count in sorted(error_counts.items()):
            errors.add_metric([route, listen, reason], count)
        connected = GaugeMetricFamily(
            PREFIX + "docker_connected", "1 while the Docker engine's event stream is up."
        )
        connected.add_metric([], 1 if state.docker_connected else 0)
        yield from (info, up, limit, errors, connected)
        yield from self._health_families(state.health)

    @staticmethod
    def _health_families(health: Iterable[HealthState]) -> Iterator[Metric]:
        backend_up = GaugeMetricFamily(
            PREFIX + "backend_up",
            "1 while a backend is in its route's pool (ready: checked, or not ejected).",
            labels=[*ROUTE_LABELS, "backend"],
        )
        checks = CounterMetricFamily(
            PREFIX + "health_checks",
            "Active health checks of a route's backends, by result (pass, fail, timeout).",
            labels=[*ROUTE_LABELS, "result"],
        )
        ejections = CounterMetricFamily(
            PREFIX + "backend_ejections",
            "Backends of a route taken out of its pool after failed dials in a row.",
            labels=ROUTE_LABELS,
        )
        for h in health:
            for backend, ready in h.backends:
                backend_up.add_metric([h.route, h.listen, backend], 1 if ready else 0)
            for result, n in h.results or ():
                checks.add_metric([h.route, h.listen, result], n)
            ejections.add_metric([h.route, h.listen], h.ejections)
        yield from (backend_up, checks, ejections)

    def _counter_families(
        self,
        routes: Iterable[RouteCounters],
        kernel_routes: Collection[str] = (),
        kernel: Mapping[str, KernelCounts] | None = None,
    ) -> Iterator[Metric]:
        """The data plane's counters, each route exporting the families of its transport;
        a kernel route (`kernel_routes`) adds the kernel's counts (see the module doc)."""

        def counter(name: str, doc: str, *extra: str) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=[*ROUTE_LABELS, *extra])

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=ROUTE_LABELS)

        def histogram(name: str, doc: str) -> HistogramMetricFamily:
            return HistogramMetricFamily(PREFIX + name, doc, labels=ROUTE_LABELS)

        conns = counter("connections", "TCP connections accepted and relayed.")
        active = gauge("connections_active", "TCP connections open now.")
        rejected = counter("connections_rejected", "TCP connections refused, by reason.", "reason")
        dial_err = counter("upstream_dial_errors", "Failed upstream dials.")
        nbytes = counter(
            "bytes", "Bytes relayed; in = client to upstream, out = upstream to client.",
            "direction",
        )  # fmt: skip
        ip_bytes = counter(
            "ip_bytes", "IP bytes (headers included) the kernel forwarded for a kernel route; "
            "in = client to upstream, out = upstream to client.", "direction",
        )  # fmt: skip
        ip_packets = counter(
            "ip_packets", "IP packets the kernel forwarded for a kernel route, by direction.",
            "direction",
        )  # fmt: skip
        sessions = gauge("udp_sessions_active", "UDP sessions open now.")
        dgrams = counter("udp_datagrams", "UDP datagrams relayed.", "direction")
        dropped = counter("udp_datagrams_dropped", "UDP datagrams dropped, by reason.", "reason")
        dial = histogram(
            "upstream_dial_duration_seconds", "Time to connect to an upstream backend."
        )
        duration = histogram(
            "connection_duration_seconds", "Lifetime of a relayed TCP connection or UDP session."
        )
        for c in routes:
            ids = [c.route, c.listen]
            if c.listen in kernel_routes:
                k = kernel.get(c.listen) if kernel is not None else None
                if k is None:  # the kernel could not be read, or has no such route yet
                    continue
                for way, octets, packets in (("in", k.bytes_in, k.packets_in),
                                             ("out", k.bytes_out, k.packets_out)):
                    ip_bytes.add_metric([*ids, way], octets)
                    ip_packets.add_metric([*ids, way], packets)
                if c.transport == "udp":
                    sessions.add_metric(ids, c.udp_sessions_active + k.active)
                    dgrams.add_metric([*ids, "in"], c.udp_datagrams_in + k.packets_in)
                    dgrams.add_metric([*ids, "out"], c.udp_datagrams_out + k.packets_out)
                    for reason, n in c.udp_dropped.items():
                        dropped.add_metric([*ids, reason], n + k.rejected.get(reason, 0))
                    continue
                conns.add_metric(ids, c.connections_total + k.connections)
                active.add_metric(ids, c.connections_active + k.active)
                for reason, n in c.rejected.items():
                    rejected.add_metric([*ids, reason], n + k.rejected.get(reason, 0))
                continue
            nbytes.add_metric([*ids, "in"], c.bytes_in)
            nbytes.add_metric([*ids, "out"], c.bytes_out)
            hist = c.connection_durations
            duration.add_metric(
                ids, list(zip(self._DURATION_LE, hist.cumulative(), strict=True)), hist.sum
            )
            if c.transport == "udp":
                sessions.add_metric(ids, c.udp_sessions_active)
                dgrams.add_metric([*ids, "in"], c.udp_datagrams_in)
                dgrams.add_metric([*ids, "out"], c.udp_datagrams_out)
                for reason, n in c.udp_dropped.items():
                    dropped.add_metric([*ids, reason], n)
                continue
            conns.add_metric(ids, c.connections_total)
            active.add_metric(ids, c.connections_active)
            for reason, n in c.rejected.items():
                rejected.add_metric([*ids, reason], n)
            dial_err.add_metric(ids, c.dial_errors)
            hist = c.dial_durations
            dial.add_metric(ids, list(zip(self._DIAL_LE, hist.cumulative(), strict=True)), hist.sum)
        yield from (conns, active, rejected, dial_err, nbytes, ip_bytes, ip_packets)
        yield from (sessions, dgrams, dropped, dial, duration)
