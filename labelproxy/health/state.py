"""One backend's health state and its transitions (pure: the caller passes the time).

Active side (HAProxy's `rise`/`fall`): a backend of a checked route starts `starting` (not
ready) and is `up` after `rise` passes in a row; an `up` backend is `down` after `fall`
failures in a row and `up` again after `rise` passes. A backend of a route without an active
check (`none`, `docker`) is up at once. When a route's check is turned on, its existing
backends stay up until `fall` failures say otherwise.

Passive side (Envoy's consecutive-5xx outlier detection, for dials): `PassivePolicy.failures`
failed dials in a row eject a ready backend for `base_ejection x n`, capped at
`max_ejection`, where n counts its recent ejections (one is forgiven for every
`base_ejection` it stayed in). It comes back when the ejection has run out and, on a checked
route, its next check passes. A dial that succeeds resets the count. The last ready backend
of a route is never ejected on passive evidence alone (`others_ready == 0`).

Every transition returns the reason when readiness changed (for the one log line and the
listeners), else None. Monotonic times (`now`) schedule; wall times (`wall`) are shown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from labelproxy.healthcheck import HealthCheck, Result, render_seconds

logger = logging.getLogger(__name__)

Phase = Literal["unchecked", "starting", "up", "down", "ejected"]


@dataclass(frozen=True, slots=True)
class PassivePolicy:
    """When failed dials eject a backend, and for how long."""

    failures: int = 3
    base_ejection: float = 10.0
    max_ejection: float = 300.0


@dataclass(slots=True)
class BackendState:
    """The mutable health state of one backend of one route (owned by the checker)."""

    checked: bool
    up: bool
    since: float  # wall time of the last readiness change (or of the first sight)
    ever_up: bool = False
    passes: int = 0  # in a row
    failures: int = 0  # in a row
    last_result: Result | None = None
    last_detail: str = ""
    last_error: str = ""
    last_check: float | None = None  # wall time
    dial_failures: int = 0  # in a row
    ejected: bool = False
    ejected_until: float = 0.0  # monotonic
    ejected_until_wall: float = 0.0
    ejections: int = 0  # recent ejections: the back-off multiplier
    returned_at: float = 0.0  # monotonic time of the last return from an ejection
    spared: bool = False  # the last-ready rule kept it in (logged once per streak)

    @classmethod
    def new(cls, check: HealthCheck, *, wall: float) -> BackendState:
        """A backend seen for the first time: `starting` when checked, else ready."""
        return cls(checked=check.active, up=not check.active, since=wall)

    @property
    def ready(self) -> bool:
        return self.up and not self.ejected

    @property
    def phase(self) -> Phase:
        if self.ejected:
            return "ejected"
        if not self.checked:
            return "unchecked"
        if self.up:
            return "up"
        return "down" if self.ever_up else "starting"

    def recheck(self, check: HealthCheck, *, wall: float) -> str | None:
        """The route's check changed kind or was turned on/off; counts start again."""
        was = self.ready
        self.checked = check.active
        self.passes = self.failures = 0
        if not check.active:
            self.up = True
            self.last_result = None
            self.last_detail = self.last_error = ""
        return self._changed(was, "healthcheck turned off", wall=wall)

    def record_check(
        self, result: Result, detail: str, check: HealthCheck, *, now: float, wall: float
    ) -> str | None:
        """Count one active check's result; the reason if readiness changed."""
        was = self.ready
        self.last_result, self.last_detail, self.last_check = result, detail, wall
        if result == "pass":
            self.passes += 1
            self.failures = 0
            if not self.up and self.passes >= check.rise:
                self.up = self.ever_up = True
            if self.up and not self.ever_up:
                self.ever_up = True
            reason = f"check passed {self.passes} time(s) in a row: {detail}"
            if self.ejected and now >= self.ejected_until:
                self._return(now)
                reason = f"ejection over and check passed: {detail}"
        else:
            self.last_error = detail
            self.failures += 1
            self.passes = 0
            if self.up and self.failures >= check.fall:
                self.up = False
            reason = f"check {result} {self.failures} time(s) in a row: {detail}"
        return self._changed(was, reason, wall=wall)

    def record_dial_failure(
        self, why: str, policy: PassivePolicy, *, others_ready: int, now: float, wall: float
    ) -> str | None:
        """Count a failed dial; the reason if it ejected the backend (`spared` turns True
        when only the last-ready rule kept it in)."""
        if not self.ready:
            return None
        self.dial_failures += 1
        if self.dial_failures < policy.failures:
            return None
        if others_ready == 0:
            self.spared = True  # the checker logs the first sparing of a streak
            return None
        if self.ejections and self.returned_at:
            forgiven = int((now - self.returned_at) // policy.base_ejection)
            self.ejections = max(0, self.ejections - forgiven)
        self.ejections += 1
        duration = min(policy.base_ejection * self.ejections, policy.max_ejection)
        count = self.dial_failures
        self.ejected = True
        self.ejected_until = now + duration
        self.ejected_until_wall = wall + duration
        self.dial_failures = 0
        self.spared = False
        return f"ejected for {render_seconds(duration)} after {count} failed dials ({why})"

    def record_dial_success(self) -> None:
        self.dial_failures = 0
        self.spared = False

    def expire_ejection(self, *, now: float, wall: float) -> str | None:
        """At the end of an ejection: an unchecked backend returns; a checked one waits for
        its next pass (`record_check`)."""
        if not self.ejected or now < self.ejected_until or self.checked:
            return None
        self._return(now)
        return self._changed(False, "ejection over", wall=wall)

    def _return(self, now: float) -> None:
        self.ejected = False
        self.ejected_until = self.ejected_until_wall = 0.0
        self.returned_at = now

    def _changed(self, was: bool, reason: str, *, wall: float) -> str | None:
        if self.ready == was:
            return None
        self.since = wall
        return reason
