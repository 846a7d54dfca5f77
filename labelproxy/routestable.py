"""Read-only views of the runtime's state: the /routes JSON document and the metrics snapshot.

Both are built on demand from live state (desired routes, live listeners, problems, counters),
so what /routes and /metrics say cannot drift from what the process does.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from labelproxy.fields import MAX_ALIAS_CHARS
from labelproxy.health.views import RouteHealth
from labelproxy.metrics import HealthState, RouteCounters, RouteState, StateSnapshot
from labelproxy.spec import Problem, RouteSpec

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


def _backends(spec: RouteSpec, health: RouteHealth | None) -> list[dict[str, Any]]:
    """Each backend with its health (`ready`, `state`, last check...) where the checker has
    it; a backend the checker does not know yet shows `ready` null."""
    known = {} if health is None else {b.backend: b for b in health.backends}
    out: list[dict[str, Any]] = []
    for b in spec.backends:
        doc: dict[str, Any] = {"address": str(b), "container": b.container_name or None}
        status = known.get(b)
        if status is None:
            doc["ready"] = None
        else:
            found = status.as_json()
            del found["backend"], found["container"]
            doc.update(found)
        out.append(doc)
    return out


def _problem(p: Problem) -> dict[str, str]:
    doc = asdict(p)
    doc["text"] = str(p)
    return doc


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

    def routes_document(self) -> dict[str, Any]:
        rt = self._rt
        rec = rt.reconciler
        desired = rec.desired.routes if rec else {}
        routes: list[dict[str, Any]] = []
        health = rt.health.statuses()
        for key in sorted(desired):
            spec = desired[key]
            live = rec.live.get(key) if rec else None
            counters = rt.metrics.counters(key) or RouteCounters(spec.alias)
            if live is not None and live.spec == spec:
                state = "up"
            elif rec and key in rec.bind_problems:
                state = "error"
            else:
                state = "pending"
            routes.append(
                {
                    "route": spec.alias,
                    "listen": str(key),
                    "scheme": spec.scheme,
                    "state": state,
                    "source": spec.source,
                    "bound": [f"{h}:{p}" for h, p in live.bound] if live else [],
                    "backends": _backends(spec, health.get(key)),
                    "healthcheck": spec.options.healthcheck.to_fields(),
                    "options": _options(spec),
                    "errors": [str(rec.bind_problems[key])] if rec and key in rec.bind_problems
                    else [],
                    "counters": {
                        "connections_active": counters.connections_active,
                        "connections_total": counters.connections_total,
                        "bytes_in": counters.bytes_in,
                        "bytes_out": counters.bytes_out,
                        "udp_sessions_active": counters.udp_sessions_active,
                        "dial_errors": counters.dial_errors,
                        "rejected": dict(counters.rejected),
                    },
                }
            )
        return {
            "ready": rt.ready(),
            "docker": {
                "enabled": rt.settings.discovery_enabled,
                "connected": rt.docker_connected,
                "containers": len(rt.views),
            },
            "routes": routes,
            "problems": [_problem(p) for p in self._problems()],
        }

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
            routes=tuple(states), errors=errors, docker_connected=rt.docker_connected,
            health=self._health_states(),
        )  # fmt: skip

    def _health_states(self) -> tuple[HealthState, ...]:
        states: list[HealthState] = []
        for key, h in sorted(self._rt.health.statuses().items(), key=lambda kv: str(kv[0])):
            results = tuple(h.results.items()) if h.check.active else None
            backends = tuple((str(b.backend), b.ready) for b in h.backends)
            states.append(HealthState(h.route, str(key), backends, results, h.ejections))
        return tuple(states)


def _error_route(problem: Problem) -> str:
    """The `route` label of a problem: its alias, else the container or file it is in (a
    problem with no alias, such as an unknown container-level label), cut to a bounded size."""
    return (problem.route or problem.source or "-")[:MAX_ALIAS_CHARS]
