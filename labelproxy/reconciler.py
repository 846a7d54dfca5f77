"""Level-triggered reconciliation of listeners: a pure `plan` and a small idempotent `apply`.

`plan(desired, actual)` compares two snapshots (listen key -> RouteSpec) by equality and says
which listeners to stop, which to start and which to update in place (same socket, new
backends or options). `Reconciler.apply` carries a plan out, stops before starts, and never
touches a route whose spec did not change: its listener and its connections stay. A route whose
bind fails is reported as a `Problem(kind="bind")` and simply planned again on the next pass.
A listener task that dies after binding is logged, forgotten and restarted by the next pass.

Big plans are carried out in slices of `SLICE` listeners, each slice a short burst on the event
loop that then lets it run: a 5,000-port range must not hold up every relay while it binds.
The INFO log has one line per route or per run of ports (`routelog`), not one per listener.
A route's counters (`Metrics.route`, per listen key) live as long as the route is desired,
listening or draining; when none of that holds any more, its series are dropped.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from labelproxy.health.checker import HealthChecker
from labelproxy.metrics import Metrics
from labelproxy.routelog import context, log_runs, runs
from labelproxy.spec import DesiredState, EdgePolicy, ListenKey, Problem, RouteSpec
from labelproxy.streams.live import LiveRoute, Serve
from labelproxy.streams.shared import SharedState
from labelproxy.streams.tcp import serve_named, serve_tcp
from labelproxy.streams.udp import serve_udp

logger = logging.getLogger(__name__)

T = TypeVar("T")
LISTENER_CLOSE_DEADLINE = 5.0
# listeners started, stopped or updated between two turns of the event loop: one bind or
# close with its hand-over to the data loop is a fraction of a millisecond of loop time
SLICE = 32


@dataclass(frozen=True, slots=True)
class Plan:
    """What one pass must do. Keys in `stop` are stopped first, then `start` specs bound."""

    stop: tuple[ListenKey, ...] = ()
    start: tuple[RouteSpec, ...] = ()
    update: tuple[RouteSpec, ...] = ()


def plan(desired: Mapping[ListenKey, RouteSpec], actual: Mapping[ListenKey, RouteSpec]) -> Plan:
    """The minimal set of changes that turns `actual` into `desired` (pure, deterministic)."""
    stop: list[ListenKey] = []
    start: list[RouteSpec] = []
    update: list[RouteSpec] = []
    for key in sorted(actual):
        want = desired.get(key)
        have = actual[key]
        if want is None:
            stop.append(key)
        elif want == have:
            continue
        elif have.same_listener(want):
            update.append(want)
        else:
            stop.append(key)
            start.append(want)
    start.extend(desired[key] for key in sorted(desired) if key not in actual)
    start.sort(key=lambda s: s.key)
    return Plan(stop=tuple(stop), start=tuple(start), update=tuple(update))


class _StartedFlag:
    """A TaskStatus wrapper that remembers whether the listener reported "started"."""

    def __init__(self, inner: anyio.abc.TaskStatus[None]) -> None:
        self.inner = inner
        self.started_ok = False

    def started(self, value: Any = None) -> None:
        self.started_ok = True
        self.inner.started(value)


class Reconciler:
    """Owns the live listeners. `apply` is only ever called from one task at a time."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        edge: EdgePolicy,
        task_group: anyio.abc.TaskGroup,
        on_listener_lost: Callable[[], None] = lambda: None,
        health: HealthChecker | None = None,
    ) -> None:
        self._metrics = metrics
        self._edge = edge
        self._tg = task_group
        self._on_listener_lost = on_listener_lost
        self.live: dict[ListenKey, LiveRoute] = {}
        self.bind_problems: dict[ListenKey, Problem] = {}
        self.desired: DesiredState = DesiredState()
        self.draining: set[LiveRoute] = set()
        # the global caps and own-listener registry every route shares
        self.shared = SharedState.from_edge(edge, health=health)
        self.shared.listener_counters = metrics.listener
        self.shared.forget_listener = metrics.forget
        logger.info("global limits: %s", self.shared.describe(), extra={"action": "start"})
        self._draining_keys: Counter[ListenKey] = Counter()

    def actual(self) -> dict[ListenKey, RouteSpec]:
        return {key: live.spec for key, live in self.live.items()}

    async def apply(self, desired: DesiredState) -> Plan:
        """Make the listeners match `desired`; returns the plan that was carried out."""
        began = time.monotonic()
        previous = self.desired
        self.desired = desired
        # comparing thousands of specs takes tens of ms: on a worker thread, the loop runs on
        todo = await anyio.to_thread.run_sync(plan, desired.routes, self.actual())
        try:
            # stops, then starts, each slice concurrently: a listener's start or stop waits
            # for a hand-over to the data-plane thread, and a thousand of them in a row
            # would add up; tasks run in order, so ports are released and bound in plan order
            stopped: list[RouteSpec] = []
            for keys in _slices(todo.stop):
                async with anyio.create_task_group() as stopping:
                    for key in keys:
                        stopping.start_soon(self._stop, key, stopped)
            log_runs("route down", stopped, action="stop")
            for specs in _slices(todo.update):
                for spec in specs:
                    self._update(spec)
                await anyio.lowlevel.checkpoint()
            log_runs("route updated", todo.update, action="update")
            started: list[RouteSpec] = []
            failed: list[tuple[RouteSpec, str]] = []
            for specs in _slices(todo.start):
                async with anyio.create_task_group() as starting:
                    for spec in specs:
                        starting.start_soon(self._start, spec, started, failed)
            log_runs("route up", started, action="start")
            _log_bind_failures(failed)
            # forget bind problems of routes that are gone from the desired state
            for key in list(self.bind_problems):
                if key not in desired.routes:
                    del self.bind_problems[key]
            for key in previous.routes:
                self._forget_if_gone(key)
        except Exception:
            self._metrics.reconcile_total.labels("error").inc()
            raise
        self._metrics.reconcile_total.labels("ok").inc()
        self._metrics.reconcile_duration.observe(time.monotonic() - began)
        return todo

    def _update(self, spec: RouteSpec) -> None:
        live = self.live.get(spec.key)
        if live is None:  # its listener died since the plan: the next pass starts it again
            return
        live.update(spec)
        self._metrics.route(spec.alias, spec.key)  # the alias served there may be a new one

    async def _stop(self, key: ListenKey, stopped: list[RouteSpec]) -> None:
        live = self.live.pop(key, None)
        if live is None:  # its listener died since the plan
            return
        self.draining.add(live)
        self._draining_keys[key] += 1
        live.close()
        with anyio.move_on_after(LISTENER_CLOSE_DEADLINE):
            await live.stopped_admitting.wait()
        stopped.append(live.spec)

    async def _free_port(self, key: ListenKey) -> None:
        """A draining listener may still hold `key`'s port (a UDP one keeps its socket for
        the replies of its sessions until its drain ends): end that drain now, so the new
        listener can bind."""
        for live in list(self.draining):
            old = live.spec.key
            if (old.transport, old.port) != (key.transport, key.port):
                continue
            if not live.listener_closed.is_set():
                live.close(0)
                with anyio.move_on_after(LISTENER_CLOSE_DEADLINE):
                    await live.listener_closed.wait()

    async def _start(
        self, spec: RouteSpec, started: list[RouteSpec], failed: list[tuple[RouteSpec, str]]
    ) -> None:
        await self._free_port(spec.key)
        live = LiveRoute(
            spec,
            counters=self._metrics.route(spec.alias, spec.key),
            edge=self._edge,
            shared=self.shared,
        )
        # the engine serving the route: a second one (kernel forwarding) is chosen here
        serve: Serve = serve_tcp if spec.transport == "tcp" else serve_udp
        if spec.key.names:  # chosen by name: a member of the listener its key shares
            serve = serve_named
        try:
            await self._tg.start(self._supervise, live, serve)
        except OSError as exc:
            message = f"cannot listen on {spec.key}: {exc.strerror or exc}"
            first_time = spec.key not in self.bind_problems
            self.bind_problems[spec.key] = Problem(
                kind="bind",
                route=spec.alias,
                source=spec.source,
                label="port",
                value=str(spec.key.port),
                message=message + " (retrying)",
                listen=str(spec.key),
            )
            if first_time:
                failed.append((spec, message))
            else:
                log_ctx = context((spec,), action="bind")
                logger.debug("route bind failed: %s", message, extra=log_ctx)
            return
        self.bind_problems.pop(spec.key, None)
        self.live[spec.key] = live
        started.append(spec)

    def _forget_if_gone(self, key: ListenKey) -> None:
        """Drop the series of the route on `key` once it is not desired, listening or
        draining any more (a route restarted or updated in place keeps its counters)."""
        if key in self.desired.routes or key in self.live or self._draining_keys[key]:
            return
        del self._draining_keys[key]
        self._metrics.forget(key)

    async def _supervise(
        self,
        live: LiveRoute,
        serve: Serve,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        status = _StartedFlag(task_status)
        try:
            await serve(live, task_status=status)
        except Exception:
            if not status.started_ok:
                raise
            logger.exception("listener failed", extra=context((live.spec,), action="crash"))
        finally:
            key = live.spec.key
            if live in self.draining:
                self.draining.discard(live)
                self._draining_keys[key] -= 1
            if self.live.get(key) is live:
                # died on its own: forget it so the next pass starts it again
                del self.live[key]
                self._on_listener_lost()
            self._forget_if_gone(key)

    async def close_all(self, *, drain_timeout: float) -> None:
        """Shutdown: stop admitting everywhere, then wait until every listener finished its
        drain (each ends what is left at its own deadline: `drain_timeout` at the latest)."""
        lives = list(self.live.values()) + list(self.draining)
        self.live.clear()
        for live in lives:
            live.close(drain_timeout)
        for live in lives:
            await live.finished.wait()


def _slices(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """`items` in slices of `SLICE`."""
    for first in range(0, len(items), SLICE):
        yield items[first : first + SLICE]


def _log_bind_failures(failed: Sequence[tuple[RouteSpec, str]]) -> None:
    """One ERROR line per route or run of ports that failed to bind for the first time."""
    message_of = {spec.key: message for spec, message in failed}
    for run in runs(spec for spec, _ in failed):
        message = message_of[run[0].key]
        if len(run) > 1:
            message += f" (and {len(run) - 1} more ports of the range)"
        logger.error("route bind failed: %s", message, extra=context(run, action="bind"))
