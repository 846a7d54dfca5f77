"""`HealthChecker`: which backends of each route are ready, kept by active checks and dials.

    checker = HealthChecker(max_concurrent=64)
    await task_group.start(checker.serve)          # runs until cancelled
    checker.set_targets({key: HealthTarget(check, backends, route=alias), ...})
    checker.ready_backends(key)                     # the pool, any thread, lock-free
    checker.report_dial_failure(key, backend, why="Connection refused")   # any thread
    checker.report_dial_success(key, backend)                             # any thread
    await checker.wait_ready(key, timeout=5.0)      # event-loop thread

Scheduling: the default check (`tcp`, IP-literal backends) of every backend runs on the loop
`check_loop()` gives (the runtime gives the TCP data loop, so these checks never hand the
interpreter lock over; without one, on the asyncio loop), through `tcpbatch.TcpBatch`; other
checks run from one task per checked backend (none for `none`/`docker` routes, nor for the
ports of a range that follow its first port, see `targets`). At most one check is in flight per
backend, and at most `max_concurrent` in all (`slots.CheckSlots`, taken from both threads). A
backend still `starting` is checked every `min(interval, starting_interval)`, others every
`interval`, each wait spread by +-`jitter`; a new backend's first check comes within `jitter x`
its first wait. When an ejection runs out, a checked backend is checked at once.

Threads: the state sits behind one `threading.Lock`, held only for bookkeeping (never across
I/O or a listener). Each route's ready backends are published as a tuple replaced whole, so
`ready_backends` and `is_ready` read without the lock from any thread (the TCP data loop has
its own). Readiness changes on the event loop (checks, the end of an ejection, `set_targets`)
and on the check loop's thread (default checks; ejections on the data plane's); `wait_ready`'s
events are set on their own loop either way (handed over). Listeners run on the thread where
the change happened, with the lock released: a listener owning thread-confined state hands
over (`DataLoop.submit`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread

from labelproxy.health.probes import OwnLookup, ProbeResult, probe
from labelproxy.health.slots import CheckSlots
from labelproxy.health.state import BackendState, PassivePolicy
from labelproxy.health.targets import range_owner
from labelproxy.health.tcpbatch import AsyncioCheckLoop, CheckLoop, TcpBatch, TcpJob, batchable
from labelproxy.health.views import (
    BackendStatus,
    HealthTarget,
    RouteHealth,
    StateChange,
    log_change,
    log_context,
    log_range,
)
from labelproxy.healthcheck import RESULTS, HealthCheck, Result
from labelproxy.spec import Backend, ListenKey

logger = logging.getLogger(__name__)

Listener = Callable[[StateChange], None]


@dataclass(eq=False, slots=True)
class _Route:
    route: str
    check: HealthCheck
    order: tuple[Backend, ...] = ()  # the target's order, kept by the published pool
    states: dict[Backend, BackendState] = field(default_factory=dict)
    watchers: dict[Backend, _Watcher | TcpJob] = field(default_factory=dict)
    results: dict[Result, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    ejections: int = 0
    follows: ListenKey | None = None  # a port of a range: the route whose checks it takes


@dataclass(eq=False, slots=True)
class _Watcher:
    """The check task of one backend: `scope` ends it, `nap` (while it waits) is cancelled
    to check at once. A plain sleep ends the wait: a timeout that fires (`move_on_after`)
    costs anyio a cancellation delivery, ~1 ms of CPU here, on every check."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    nap: anyio.CancelScope | None = None

    def wake(self) -> None:
        if self.nap is not None:
            self.nap.cancel()


class HealthChecker:
    """Per-route, per-backend readiness from active checks and passive dial reports."""

    def __init__(
        self,
        *,
        max_concurrent: int = 64,
        passive: PassivePolicy | None = None,
        starting_interval: float = 1.0,
        jitter: float = 0.1,
        check_loop: Callable[[], CheckLoop] | None = None,
    ) -> None:
        self.passive = passive or PassivePolicy()
        self.starting_interval = starting_interval
        self.jitter = jitter
        self._slots = CheckSlots(max_concurrent)
        self._lock = threading.Lock()
        self._routes: dict[ListenKey, _Route] = {}
        self._ready: dict[ListenKey, tuple[Backend, ...]] = {}
        self._ready_events: dict[ListenKey, anyio.Event] = {}
        self._listeners: list[Listener] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._loop_thread: int | None = None
        # route -> its backend -> the (route, backend) pairs of the ports of its range that
        # take that backend's check results (`HealthTarget.follows`)
        self._mirrors: dict[ListenKey, dict[Backend, tuple[tuple[ListenKey, Backend], ...]]] = {}
        self.own: OwnLookup | None = None  # labelproxy's own listeners: never checked
        # the default checks (`tcp`, IP literals) of every backend, on the check loop
        self._check_loop = check_loop
        self._aloop: asyncio.AbstractEventLoop | None = None  # while serving
        self._batch = TcpBatch(on_results=self._batch_results, own=lambda: self.own,
                               slots=self._slots)

    # -- lifecycle and targets (event-loop thread) ------------------------------------------
    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the checks until cancelled; `started` once targets can be checked."""
        async with anyio.from_thread.BlockingPortal() as portal, anyio.create_task_group() as tg:
            self._tg, self._portal, self._loop_thread = tg, portal, threading.get_ident()
            self._aloop = asyncio.get_running_loop()
            self._batch.attach(self._check_loop() if self._check_loop is not None
                               else AsyncioCheckLoop(self._aloop))
            try:
                with self._lock:
                    for key, route in self._routes.items():
                        for backend in route.states:
                            self._watch(key, route, backend)
                task_status.started()
                await anyio.sleep_forever()
            finally:
                self._batch.detach()
                self._tg = self._portal = self._loop_thread = self._aloop = None

    def set_targets(self, targets: Mapping[ListenKey, HealthTarget]) -> None:
        """Make the checked routes exactly `targets` (idempotent). A backend keeps its state
        while it stays in its route; a new one starts `starting` when its route is checked."""
        changes: list[StateChange] = []
        wall = time.time()
        with self._lock:
            for key in [k for k in self._routes if k not in targets]:
                route = self._routes.pop(key)
                for watcher in route.watchers.values():
                    watcher.scope.cancel()
                self._ready.pop(key, None)
            for key, target in targets.items():
                changes.extend(self._apply(key, target, wall=wall))
                self._publish(key)
            self._mirrors = self._mirror_map()
        self._notify(changes)

    def _mirror_map(self) -> dict[ListenKey, dict[Backend, tuple[tuple[ListenKey, Backend], ...]]]:
        """For each checked backend, the backends of the ports of its range that follow it
        (the same container and host, the same offset from the listen port)."""
        found: dict[ListenKey, dict[Backend, list[tuple[ListenKey, Backend]]]] = {}
        for key, route in self._routes.items():
            leader = self._routes.get(route.follows) if route.follows is not None else None
            if leader is None or route.follows is None:
                continue
            by_owner = {range_owner(route.follows, b): b for b in leader.order}
            mirrors = found.setdefault(route.follows, {})
            for backend in route.order:
                checked = by_owner.get(range_owner(key, backend))
                if checked is not None:
                    mirrors.setdefault(checked, []).append((key, backend))
        return {key: {b: tuple(pairs) for b, pairs in m.items()} for key, m in found.items()}

    def _apply(self, key: ListenKey, target: HealthTarget, *, wall: float) -> list[StateChange]:
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = _Route(target.route, target.check)
        changes: list[StateChange] = []
        old = route.check
        route.route, route.check, route.order = target.route, target.check, target.backends
        if target.follows != route.follows:
            route.follows = target.follows
            for task in route.watchers.values():
                task.scope.cancel()
            route.watchers.clear()
        keep = set(target.backends)
        for backend in [b for b in route.states if b not in keep]:
            del route.states[backend]
            watcher = route.watchers.pop(backend, None)
            if watcher is not None:
                watcher.scope.cancel()
        for backend in target.backends:
            state = route.states.get(backend)
            if state is None:
                route.states[backend] = BackendState.new(target.check, wall=wall)
            elif old != target.check and (not old.same_probe(target.check)):
                reason = state.recheck(target.check, wall=wall)
                if reason is not None:
                    changes.append(self._change(key, route, backend, state, reason))
            if old != target.check:
                watcher = route.watchers.pop(backend, None)
                if watcher is not None:
                    watcher.scope.cancel()  # restarts below with the new timing
            self._watch(key, route, backend)
        return changes

    def _watch(self, key: ListenKey, route: _Route, backend: Backend) -> None:
        if (self._tg is None or not route.check.active or backend in route.watchers
                or route.follows is not None):
            return
        if batchable(route.check, backend):
            state = route.states.get(backend)
            if state is None:
                return
            job = route.watchers[backend] = self._batch.job(key, route, backend, route.check)
            self._batch.schedule(
                job, self._delay(route.check, state) * self.jitter * random.random())
            return
        watcher = route.watchers[backend] = _Watcher()
        self._tg.start_soon(self._run_checks, key, route, backend, watcher)

    # -- the check loop of one backend ------------------------------------------------------
    async def _run_checks(
        self, key: ListenKey, route: _Route, backend: Backend, watcher: _Watcher
    ) -> None:
        with watcher.scope:
            first = route.states.get(backend)
            if first is None:
                return  # removed before this task ran (its scope is cancelled too)
            delay = self._delay(route.check, first) * self.jitter * random.random()
            while True:
                with anyio.CancelScope() as watcher.nap:
                    await anyio.sleep(delay)
                watcher.nap = None
                check = route.check
                await self._slots.take()
                try:
                    result = await probe(
                        check, host=backend.host, port=backend.port, transport=key.transport,
                        own=self.own,
                    )
                finally:
                    self._slots.give()
                changes: list[StateChange] = []
                mirrored: list[StateChange] = []
                with self._lock:
                    found = self._record(key, route, backend, result, check,
                                         changes=changes, mirrored=mirrored)
                self._announce(changes, mirrored)
                if found is None:
                    return
                delay = found * random.uniform(1 - self.jitter, 1 + self.jitter)

    def _batch_results(self, done: list[tuple[TcpJob, ProbeResult]]) -> None:
        """(the check loop's thread) The results of `tcp` checks (`TcpBatch`), recorded
        under one lock; each job that stays is scheduled again."""
        changes: list[StateChange] = []
        mirrored: list[StateChange] = []
        with self._lock:
            for job, result in done:
                delay = self._record(job.key, job.route, job.backend, result, job.check,
                                     changes=changes, mirrored=mirrored)
                if delay is None:
                    job.cancel()
                else:
                    self._batch.schedule(
                        job, delay * random.uniform(1 - self.jitter, 1 + self.jitter))
        self._announce(changes, mirrored)

    def _record(
        self, key: ListenKey, route: _Route, backend: Backend, result: ProbeResult,
        check: HealthCheck, *, changes: list[StateChange], mirrored: list[StateChange],
    ) -> float | None:
        """(lock held) Count one check's result, noting readiness changes; the delay to the
        backend's next check, or None when it left its route."""
        state = route.states.get(backend)
        if state is None or self._routes.get(key) is not route:
            return None
        route.results[result.result] += 1
        reason = state.record_check(
            result.result, result.detail, check, now=time.monotonic(), wall=time.time()
        )
        if reason is not None:
            changes.append(self._change(key, route, backend, state, reason))
            self._publish(key)
        mirrored.extend(self._record_mirrors(key, backend, result, check))
        return self._delay(check, state)

    def _announce(self, changes: list[StateChange], mirrored: list[StateChange]) -> None:
        self._notify(changes)
        if mirrored:  # the other ports of a range: one line each way, not one each
            self._notify(mirrored, log=False)
            log_range(mirrored, log=logger)

    def _record_mirrors(
        self, key: ListenKey, backend: Backend, result: ProbeResult, check: HealthCheck
    ) -> list[StateChange]:
        """(lock held) The other ports of a range take the check of its first port."""
        changes: list[StateChange] = []
        mirrors = self._mirrors.get(key)
        followers = mirrors.get(backend, ()) if mirrors else ()
        if not followers:
            return changes
        detail = f"{result.detail} (checked on {backend})"
        now, wall = time.monotonic(), time.time()
        for other_key, other in followers:
            route = self._routes.get(other_key)
            state = route.states.get(other) if route is not None else None
            if route is None or state is None:
                continue
            reason = state.record_check(result.result, detail, check, now=now, wall=wall)
            if reason is not None:
                changes.append(self._change(other_key, route, other, state, reason))
                self._publish(other_key)
        return changes

    def _delay(self, check: HealthCheck, state: BackendState) -> float:
        if state.checked and not state.up and not state.ever_up:
            return min(check.interval, self.starting_interval)
        if state.ejected:
            return max(0.0, min(check.interval, state.ejected_until - time.monotonic()))
        return check.interval

    # -- passive evidence (any thread) ------------------------------------------------------
    def report_dial_failure(self, key: ListenKey, backend: Backend, *, why: str = "") -> bool:
        """A dial to `backend` failed (refused, timeout, reset before any byte); True when
        this ejected it from the pool (its return is timed by `serve`, which must run)."""
        with self._lock:
            route = self._routes.get(key)
            state = route.states.get(backend) if route is not None else None
            if route is None or state is None:
                return False
            others = sum(1 for b, s in route.states.items() if s.ready and b != backend)
            was_spared = state.spared
            now = time.monotonic()
            reason = state.record_dial_failure(
                why, self.passive, others_ready=others, now=now, wall=time.time()
            )
            if reason is None:
                spared = state.spared and not was_spared
                count = state.dial_failures
            else:
                route.ejections += 1
                change = self._change(key, route, backend, state, reason)
                self._publish(key)
                until = state.ejected_until
        if reason is None:
            if spared:
                logger.warning(
                    "%d dials in a row failed (%s); the route's last ready backend stays in",
                    count, why, extra=log_context(key, route.route, backend, "backend_spared"),
                )  # fmt: skip
            return False
        self._notify([change])
        self._call_on_loop(self._end_ejection, key, route, backend, until)
        return True

    def report_dial_success(self, key: ListenKey, backend: Backend) -> None:
        """A dial to `backend` connected: its count of failed dials starts again."""
        route = self._routes.get(key)
        state = route.states.get(backend) if route is not None else None
        if state is None or not (state.dial_failures or state.spared):
            return  # the common case: no lock taken
        with self._lock:
            state.record_dial_success()

    def _call_on_loop(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: object) -> None:
        tg, portal = self._tg, self._portal
        if tg is None or portal is None:
            return  # not serving: nothing can run the timer
        if threading.get_ident() == self._loop_thread:
            tg.start_soon(fn, *args)
        else:
            portal.start_task_soon(fn, *args)

    async def _end_ejection(
        self, key: ListenKey, route: _Route, backend: Backend, until: float
    ) -> None:
        while (left := until - time.monotonic()) > 0:  # never a hair early
            await anyio.sleep(left)
        with self._lock:
            state = route.states.get(backend)
            if state is None or self._routes.get(key) is not route:
                return
            watcher = route.watchers.get(backend)
            reason = state.expire_ejection(now=time.monotonic(), wall=time.time())
            change = None
            if reason is not None:
                change = self._change(key, route, backend, state, reason)
                self._publish(key)
        if watcher is not None:
            watcher.wake()  # checked: its next pass brings it back
        if change is not None:
            self._notify([change])

    # -- reading (any thread, except wait_ready) --------------------------------------------
    def tracks(self, key: ListenKey) -> bool:
        return key in self._routes

    def ready_backends(self, key: ListenKey) -> tuple[Backend, ...]:
        """The ready backends of route `key`, in its target order (empty if unknown)."""
        return self._ready.get(key, ())

    def is_ready(self, key: ListenKey, backend: Backend) -> bool:
        return backend in self._ready.get(key, ())

    async def wait_ready(self, key: ListenKey, *, timeout: float) -> tuple[Backend, ...]:
        """The ready backends of `key` as soon as there is one, or () after `timeout`."""
        with anyio.move_on_after(timeout):
            while not self._ready.get(key):
                event = self._ready_events.setdefault(key, anyio.Event())
                if self._ready.get(key):  # published (on another thread) before it was set
                    break
                await event.wait()
        return self._ready.get(key, ())

    def status(self, key: ListenKey) -> RouteHealth | None:
        """A consistent copy of route `key`'s health, or None if unknown."""
        with self._lock:
            route = self._routes.get(key)
            if route is None:
                return None
            return RouteHealth(
                key, route.route, route.check,
                tuple(BackendStatus.of(b, s) for b, s in route.states.items()),
                dict(route.results) if route.follows is None else {}, route.ejections,
            )  # fmt: skip

    def statuses(self) -> dict[ListenKey, RouteHealth]:
        found = {key: self.status(key) for key in list(self._routes)}
        return {key: health for key, health in found.items() if health is not None}

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` on every readiness change; returns the function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # -- publishing (lock held) and notifying (lock released) -------------------------------
    def _publish(self, key: ListenKey) -> None:
        route = self._routes[key]
        ready = tuple(b for b in route.order if route.states[b].ready)
        self._ready[key] = ready
        if not ready:
            return
        if threading.get_ident() == self._loop_thread:
            event = self._ready_events.pop(key, None)
            if event is not None:
                event.set()
        elif (aloop := self._aloop) is not None and key in self._ready_events:
            event = self._ready_events.pop(key, None)
            if event is not None:
                aloop.call_soon_threadsafe(event.set)

    def _change(
        self, key: ListenKey, route: _Route, backend: Backend, state: BackendState, reason: str
    ) -> StateChange:
        return StateChange(key, route.route, backend, state.ready, state.phase, reason)

    def _notify(self, changes: list[StateChange], *, log: bool = True) -> None:
        for change in changes:
            extra = log_context(change.key, change.route, change.backend, change.phase)
            extra["reason"] = change.reason
            if log:
                log_change(change, extra, log=logger)
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception:
                    logger.exception("health listener failed", extra=extra)

