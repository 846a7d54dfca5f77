"""What the checker takes in and hands out, as frozen values.

`HealthTarget`: one route's check and backends (input of `HealthChecker.set_targets`).
`StateChange`: one backend's readiness changed (to listeners and the log line).
`BackendStatus` / `RouteHealth`: a consistent copy of a route's health for `/routes`,
`labelproxy routes` and the metrics collector (read at scrape time). `log_context`: the
context fields of a health log line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from labelproxy.health.state import BackendState, Phase
from labelproxy.healthcheck import HealthCheck, Result
from labelproxy.spec import Backend, ListenKey

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HealthTarget:
    """A route as the checker sees it; `route` is its alias (for logs and metric labels)."""

    check: HealthCheck
    backends: tuple[Backend, ...]
    route: str = ""
    # a port of a range other than its first: not checked itself, its backends take the
    # results of the same container's backend on the range's first port (`follows`)
    follows: ListenKey | None = None


@dataclass(frozen=True, slots=True)
class StateChange:
    """`backend` of route `key` became ready (`ready`) or left the pool, and why."""

    key: ListenKey
    route: str
    backend: Backend
    ready: bool
    phase: Phase
    reason: str


def log_context(key: ListenKey, route: str, backend: Backend, action: str) -> dict[str, object]:
    """The `extra=` of a health log line (the context fields of `labelproxy.logs`)."""
    return {
        "route": route,
        "listen": str(key),
        "backend": str(backend),
        "container": backend.container_name,
        "action": action,
    }


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """One backend's health: `ready` is what the pool uses; `phase` says why.

    Times are wall-clock seconds (`since`: last readiness change; `last_check`; the end of an
    ejection). `last_result`/`last_detail` are the last active check's, `last_error` the
    detail of the last failed one.
    """

    backend: Backend
    ready: bool
    phase: Phase
    since: float
    last_result: Result | None = None
    last_detail: str = ""
    last_error: str = ""
    last_check: float | None = None
    dial_failures: int = 0
    ejected_until: float | None = None

    @classmethod
    def of(cls, backend: Backend, state: BackendState) -> BackendStatus:
        return cls(
            backend=backend,
            ready=state.ready,
            phase=state.phase,
            since=state.since,
            last_result=state.last_result,
            last_detail=state.last_detail,
            last_error=state.last_error,
            last_check=state.last_check,
            dial_failures=state.dial_failures,
            ejected_until=state.ejected_until_wall if state.ejected else None,
        )

    def as_json(self) -> dict[str, object]:
        """The `/routes` form of this status."""
        return {
            "backend": str(self.backend),
            "container": self.backend.container_name,
            "ready": self.ready,
            "state": self.phase,
            "since": round(self.since, 3),
            "last_result": self.last_result,
            "last_detail": self.last_detail,
            "last_error": self.last_error,
            "last_check": None if self.last_check is None else round(self.last_check, 3),
            "dial_failures": self.dial_failures,
            "ejected_until": None if self.ejected_until is None else round(self.ejected_until, 3),
        }


@dataclass(frozen=True, slots=True)
class RouteHealth:
    """A route's check, its backends' status and its counters since the route appeared:
    `results` (pass/fail/timeout) for `labelproxy_health_checks_total{route,listen,result}`
    (empty for a port of a range that follows its first port: no check runs there, so no
    series of zeros per port) and `ejections` for `labelproxy_backend_ejections_total`."""

    key: ListenKey
    route: str
    check: HealthCheck
    backends: tuple[BackendStatus, ...]
    results: Mapping[Result, int] = field(default_factory=dict)
    ejections: int = 0

    @property
    def ready(self) -> tuple[Backend, ...]:
        return tuple(b.backend for b in self.backends if b.ready)


def log_change(change: StateChange, extra: dict[str, object], *, log: logging.Logger) -> None:
    """The one line of a readiness change (on the checker's logger, `log`)."""
    if change.ready:
        log.info("backend ready", extra=extra)
    else:
        log.warning("backend not ready", extra=extra)


def log_range(changes: list[StateChange], *, log: logging.Logger) -> None:
    """The ports of a range that took their first port's check: one line per direction."""
    for ready in (True, False):
        group = [c for c in changes if c.ready == ready]
        if not group:
            continue
        first = group[0]
        ports = sorted(c.key.port for c in group)
        extra = log_context(first.key, first.route, first.backend, first.phase)
        extra["listen"] = f"{first.key.transport}://{first.key.bind}:{ports[0]}-{ports[-1]}"
        extra["reason"] = f"{first.reason} ({len(group)} ports of a range)"
        log_change(first, extra, log=log)
