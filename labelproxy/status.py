"""What the process shows of its state: the /routes document and the state gauges of /metrics.

Both are taken on demand from the reconciler (desired routes, live listeners, bind problems)
and the runtime's `Inputs` (readiness, the engine), with the route counters, so what /routes
and /metrics say cannot drift from what the process does. Both are snapshots of plain,
immutable values taken on the event loop; the expensive part (the JSON document, the
Prometheus text) is written from them on a worker thread. This module reads the reconciler and
its inputs, never the runtime that holds them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from labelproxy.health.views import RouteHealth
from labelproxy.metrics import HealthState, Metrics, RouteCounters, RouteState, StateSnapshot
from labelproxy.reconciler import Reconciler
from labelproxy.sources.fields import MAX_ALIAS_CHARS
from labelproxy.spec import ListenKey, Problem, RouteSpec


def _options(spec: RouteSpec) -> dict[str, Any]:
    opts = spec.options
    out: dict[str, Any] = {"load_balance": opts.load_balance}
    if opts.proxy_protocol:
        out["proxy_protocol"] = opts.proxy_protocol
    if opts.allow:
        out["allow"] = [str(n) for n in opts.allow]
    if opts.deny:
        out["deny"] = [str(n) for n in opts.deny]
    for name in ("max_connections", "idle_timeout", "connect_timeout"):
        value = getattr(opts, name)
        if value is not None:
            out[name] = value
    return out


def _backends(spec: RouteSpec, health: RouteHealth | None) -> list[dict[str, Any]]:
    """Each backend with its health (`ready`, `state`, last check...) where the checker has
    it; a backend the checker does not know yet shows `ready` null."""
    known = {} if health is None else {b.backend: b for b in health.backends}
    out: list[dict[str, Any]] = []
    for b in spec.backends:
        doc: dict[str, Any] = {"address": str(b), "container": b.container_name or None}
        found = known.get(b)
        if found is None:
            doc["ready"] = None
        else:
            shown = found.as_json()
            del shown["backend"], shown["container"]
            doc.update(shown)
        out.append(doc)
    return out


def _problem(p: Problem) -> dict[str, str]:
    doc = asdict(p)
    doc["text"] = str(p)
    return doc


_COUNTERS = (
    "connections_active", "connections_total", "bytes_in", "bytes_out", "udp_sessions_active",
    "dial_errors",
)  # fmt: skip

# One route as the snapshot holds it, in plain tuples (built by the thousand on the event
# loop, so no object per route): the desired spec, the live listener's spec (None: none),
# the addresses it is bound to, its bind problem, the values of _COUNTERS and a copy of the
# rejections by reason.
_Row = tuple[
    RouteSpec,
    RouteSpec | None,
    tuple[tuple[str, int], ...],
    Problem | None,
    tuple[int, ...],
    dict[str, int],
    dict[str, Any],
    RouteHealth | None,
]


def _route_document(row: _Row) -> dict[str, Any]:
    spec, live_spec, bound, error, counters, rejected, forwarding, health = row
    # `up`: a listener is bound on the route's key and serves the desired spec without a
    # re-bind. New backends or options (a scale, a container asleep or awake again) are
    # swapped into it in place by the pass that published them (`LiveRoute.update`), a few
    # loop turns later and without a failure mode: the route is up all along. `pending`: the
    # desired listener is not bound yet (a new route, a changed bind being re-made).
    if live_spec is not None and (live_spec is spec or live_spec.same_listener(spec)):
        state = "up"
    elif error is not None:
        state = "error"
    else:
        state = "pending"
    doc: dict[str, Any] = {
        "route": spec.alias,
        "listen": str(spec.key),
        "scheme": spec.scheme,
        "state": state,
        "source": spec.source,
        "bound": [f"{h}:{p}" for h, p in bound],
        "backends": _backends(spec, health),
        "healthcheck": spec.options.healthcheck.to_fields(),
        "options": _options(spec),
        "errors": [str(error)] if error is not None else [],
        "counters": {**dict(zip(_COUNTERS, counters, strict=True)), "rejected": rejected},
    }
    if spec.key.names:  # chosen by name on a shared listener
        doc["hostnames"] = list(spec.key.names)
    doc.update(forwarding)  # the path and why; a kernel route's counters with its share
    return doc


@dataclass(frozen=True, slots=True)
class RoutesSnapshot:
    """What /routes shows, as taken on the event loop: immutable values only, so `document`
    and `encode` may run on any thread while the runtime goes on changing."""

    ready: bool
    docker_enabled: bool
    docker_connected: bool
    containers: int
    routes: tuple[_Row, ...]  # in no particular order
    problems: tuple[Problem, ...]

    def document(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "docker": {
                "enabled": self.docker_enabled,
                "connected": self.docker_connected,
                "containers": self.containers,
            },
            "routes": [_route_document(row) for row in sorted(self.routes, key=_row_key)],
            "problems": [_problem(p) for p in self.problems],
        }

    def encode(self) -> bytes:
        """The /routes response body (indented JSON and a newline)."""
        return json.dumps(self.document(), indent=2).encode() + b"\n"


def _row_key(row: _Row) -> ListenKey:
    return row[0].key


@dataclass(frozen=True, slots=True)
class Inputs:
    """What the runtime knows of its inputs (and the one setting shown) at one moment."""

    ready: bool
    docker_enabled: bool
    docker_connected: bool
    containers: int
    udp_max_sessions: int  # the session cap of a UDP route that sets none


def problems(reconciler: Reconciler | None) -> list[Problem]:
    """Every problem now: the desired state's (labels, conflicts, addresses) and the binds'."""
    if reconciler is None:
        return []
    found = list(reconciler.desired.problems)
    found.extend(reconciler.bind_problems[k] for k in sorted(reconciler.bind_problems))
    return found


class PathView(Protocol):
    """What status reads of the forwarding (kernel or relay) of each route."""

    def route_document(self, key: ListenKey, counters: Mapping[str, Any]) -> dict[str, Any]:
        """The route's forwarding fields on /routes (counters with the kernel's share)."""
        ...

    def path_of(self, key: ListenKey) -> str:
        """`kernel` or `relay`."""
        ...


def routes_snapshot(
    reconciler: Reconciler | None,
    inputs: Inputs,
    *,
    metrics: Metrics,
    paths: PathView | None = None,
    health: Mapping[ListenKey, RouteHealth] | None = None,
    wake: Mapping[ListenKey, Mapping[str, Any]] | None = None,
) -> RoutesSnapshot:
    """The /routes document as a snapshot, cheap enough to take on the event loop: the frozen
    specs, each route's live state and a copy of its counters. Building the JSON
    (`RoutesSnapshot.encode`, hundreds of ms for thousands of routes) is left to the caller's
    worker thread, so that it does not stall the relays."""
    rows: list[_Row] = []
    if reconciler is not None:
        live = reconciler.live
        bind_problems = reconciler.bind_problems
        counters_of = metrics.counters
        for key, spec in reconciler.desired.routes.items():
            lv = live.get(key)
            c = counters_of(key) or RouteCounters(spec.alias)
            values = (c.connections_active, c.connections_total, c.bytes_in, c.bytes_out,
                      c.udp_sessions_active, c.dial_errors)  # fmt: skip
            rejected = c.rejected.copy()
            shown = {**dict(zip(_COUNTERS, values, strict=True)), "rejected": rejected}
            forwarding = paths.route_document(key, shown) if paths is not None else {}
            if wake is not None and key in wake:  # wake on demand: asleep, waking, ready
                forwarding = {**forwarding, "wake": dict(wake[key])}
            rows.append((
                spec,
                lv.spec if lv is not None else None,
                tuple(lv.bound) if lv is not None else (),
                bind_problems.get(key) if bind_problems else None,
                values,
                rejected,
                forwarding,
                health.get(key) if health is not None else None,
            ))  # fmt: skip
    return RoutesSnapshot(
        ready=inputs.ready,
        docker_enabled=inputs.docker_enabled,
        docker_connected=inputs.docker_connected,
        containers=inputs.containers,
        routes=tuple(rows),
        problems=tuple(problems(reconciler)),
    )


def metrics_state(
    reconciler: Reconciler | None,
    inputs: Inputs,
    *,
    paths: PathView | None = None,
    health: Mapping[ListenKey, RouteHealth] | None = None,
) -> StateSnapshot:
    """The state gauges of /metrics (route_info, route_up, limits, errors, the engine)."""
    states: list[RouteState] = []
    if reconciler is not None:
        desired = reconciler.desired.routes
        for key in sorted(desired):
            spec = desired[key]
            states.append(
                RouteState(
                    route=spec.alias,
                    scheme=spec.scheme,
                    listen=str(key),
                    targets=",".join(str(b) for b in spec.backends),
                    up=reconciler.live.get(key) is not None,
                    limit=spec.connection_limit(udp_default=inputs.udp_max_sessions),
                    forwarding=paths.path_of(key) if paths is not None else "relay",
                )
            )
    errors = tuple((_error_route(p), p.listen, p.kind) for p in problems(reconciler))
    return StateSnapshot(
        routes=tuple(states), errors=errors, docker_connected=inputs.docker_connected,
        health=_health_states(health or {}),
    )  # fmt: skip


def _health_states(health: Mapping[ListenKey, RouteHealth]) -> tuple[HealthState, ...]:
    """Per checked route: each backend's readiness, check results by kind, ejections."""
    states: list[HealthState] = []
    for key, h in sorted(health.items(), key=lambda kv: str(kv[0])):
        results = tuple(h.results.items()) if h.check.active else None
        backends = tuple((str(b.backend), b.ready) for b in h.backends)
        states.append(HealthState(h.route, str(key), backends, results, h.ejections))
    return tuple(states)


def _error_route(problem: Problem) -> str:
    """The `route` label of a problem: its alias, else the container or file it is in (a
    problem with no alias, such as an unknown container-level label), cut to a bounded size."""
    return (problem.route or problem.source or "-")[:MAX_ALIAS_CHARS]
