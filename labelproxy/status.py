"""Read-only views of the runtime's state: the /routes JSON document and the metrics snapshot.

Both are taken on demand from live state (desired routes, live listeners, problems, counters),
so what /routes and /metrics say cannot drift from what the process does. Both are snapshots
of plain, immutable values taken on the event loop; the expensive part (the JSON document, the
Prometheus text) is written from them on a worker thread.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from labelproxy.metrics import RouteCounters, RouteState, StateSnapshot
from labelproxy.sources.fields import MAX_ALIAS_CHARS
from labelproxy.spec import ListenKey, Problem, RouteSpec

if TYPE_CHECKING:
    from labelproxy.runtime import Runtime


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
]


def _route_document(row: _Row) -> dict[str, Any]:
    spec, live_spec, bound, error, counters, rejected = row
    if live_spec is not None and (live_spec is spec or live_spec == spec):
        state = "up"
    elif error is not None:
        state = "error"
    else:
        state = "pending"
    return {
        "route": spec.alias,
        "listen": str(spec.key),
        "scheme": spec.scheme,
        "state": state,
        "source": spec.source,
        "bound": [f"{h}:{p}" for h, p in bound],
        "backends": [
            {"address": str(b), "container": b.container_name or None} for b in spec.backends
        ],
        "options": _options(spec),
        "errors": [str(error)] if error is not None else [],
        "counters": {**dict(zip(_COUNTERS, counters, strict=True)), "rejected": rejected},
    }


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


class StateView:
    """Renders the runtime's state for the HTTP endpoints and the metrics collector."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def _problems(self) -> list[Problem]:
        rec = self._rt.reconciler
        problems = list(rec.desired.problems) if rec else []
        if rec:
            problems.extend(rec.bind_problems[k] for k in sorted(rec.bind_problems))
        return problems

    def routes_document(self) -> RoutesSnapshot:
        """The /routes document as a snapshot, cheap enough to take on the event loop: the
        frozen specs, each route's live state and a copy of its counters. Building the JSON
        (`RoutesSnapshot.encode`, hundreds of ms for thousands of routes) is left to the
        caller's worker thread, so that it does not stall the relays."""
        rt = self._rt
        rec = rt.reconciler
        rows: list[_Row] = []
        if rec:
            live = rec.live
            problems = rec.bind_problems
            counters_of = rt.metrics.counters
            for key, spec in rec.desired.routes.items():
                lv = live.get(key)
                c = counters_of(key) or RouteCounters(spec.alias)
                rows.append((
                    spec,
                    lv.spec if lv is not None else None,
                    tuple(lv.bound) if lv is not None else (),
                    problems.get(key) if problems else None,
                    (c.connections_active, c.connections_total, c.bytes_in, c.bytes_out,
                     c.udp_sessions_active, c.dial_errors),
                    c.rejected.copy(),
                ))  # fmt: skip
        return RoutesSnapshot(
            ready=rt.ready(),
            docker_enabled=rt.settings.discovery_enabled,
            docker_connected=rt.docker_connected,
            containers=len(rt.views),
            routes=tuple(rows),
            problems=tuple(self._problems()),
        )

    def metrics_state(self) -> StateSnapshot:
        rt = self._rt
        rec = rt.reconciler
        states: list[RouteState] = []
        if rec:
            for key in sorted(rec.desired.routes):
                spec = rec.desired.routes[key]
                live = rec.live.get(key)
                limit = spec.connection_limit(udp_default=rt.settings.udp_max_sessions)
                states.append(
                    RouteState(
                        route=spec.alias,
                        scheme=spec.scheme,
                        listen=str(key),
                        targets=",".join(str(b) for b in spec.backends),
                        up=live is not None,
                        limit=limit,
                    )
                )
        errors = tuple((_error_route(p), p.listen, p.kind) for p in self._problems())
        return StateSnapshot(
            routes=tuple(states), errors=errors, docker_connected=rt.docker_connected
        )


def _error_route(problem: Problem) -> str:
    """The `route` label of a problem: its alias, else the container or file it is in (a
    problem with no alias, such as an unknown container-level label), cut to a bounded size."""
    return (problem.route or problem.source or "-")[:MAX_ALIAS_CHARS]
