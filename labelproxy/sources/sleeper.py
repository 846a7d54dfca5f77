"""Wake on demand: puts idle sleep-enabled containers to sleep and wakes them for a client.

The `Sleeper` is the process's `streams.wakeup.Waker`. It keeps one `_Box` per container
whose routes carry a `spec.Sleep` (`observe`, after each reconcile pass), in one of four
states:

- `awake`: running; clients go on to its backends. Every `POLL` its routes' counters are
  read: when no TCP connection is open (held clients count), no UDP session is alive and no
  byte has moved for `idle_timeout`, it is put to sleep.
- `stopping`: the stop is in progress; new clients are held. A client admitted just before
  the state changed is seen (its connection is counted before its wake step reads the state)
  and the stop is called off. A wake asked for meanwhile starts the container once the stop
  is over.
- `asleep`: stopped, exited or paused (by labelproxy or anyone): routes bound, no backend.
- `waking`: the first admitted client asked (`request`); the dependencies (`depends_on`, in
  order) then the container are started, once however many clients come (single flight), and
  it turns `awake` when a backend of its routes is ready (health), or after `wake_timeout`.

A failed start (the engine refused it: `power.PowerRefusedError`, or anything else) closes the
held clients at once (`failed`), is logged, counted and shown on the route (`describe`).
Starting labelproxy wakes nothing and stops nothing at once: containers are taken as they are
found, and the idle clock of a running one starts then. One log line per wake and per sleep.

Everything runs on the asyncio loop, except `awake`, `failed`, `held` (any thread: lock-free
reads, a thread-safe gauge) and `request` (any thread: handed to the loop).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.abc

from labelproxy.health.checker import HealthChecker
from labelproxy.metrics import Metrics
from labelproxy.sources.power import Power, PowerError, PowerRefusedError
from labelproxy.spec import ListenKey, RouteSpec, Sleep
from labelproxy.streams.wakeup import WakeListener

logger = logging.getLogger(__name__)

State = Literal["awake", "stopping", "asleep", "waking"]
POLL = 0.25  # how often the idle clocks are read
SETTLE = 5.0  # after a stop, how long a wake waits for discovery to see the container stopped


@dataclass(slots=True)
class _Box:
    """One sleep-enabled container (see the module doc)."""

    sleep: Sleep
    keys: dict[ListenKey, str]  # its routes: listen key -> alias
    state: State
    idle_since: float
    moved: int = -1  # bytes moved by its routes at the last poll
    pending: bool = False  # a wake asked for during the stop
    failed: str = ""  # why the last wake failed ("": it did not)
    error: str = ""  # the last refused or failed start/stop, shown on the route
    trigger: tuple[str, str] = ("", "")  # route and listen of the wake's first client
    began: float = 0.0
    busy: bool = False  # a stop or wake task runs
    seen_asleep: anyio.Event = field(default_factory=anyio.Event)


class Sleeper:
    """See the module doc."""

    def __init__(self, *, power: Power, health: HealthChecker, metrics: Metrics) -> None:
        self._power = power
        self._health = health
        self._metrics = metrics
        self._boxes: dict[str, _Box] = {}
        self._listeners: list[WakeListener] = []
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    # -- the data plane's side (streams.wakeup.Waker) ---------------------------------------
    def awake(self, container_id: str) -> bool:
        box = self._boxes.get(container_id)
        return box is None or box.state == "awake"

    def failed(self, container_id: str) -> str:
        box = self._boxes.get(container_id)
        return "" if box is None else box.failed

    def request(self, sleep: Sleep, *, route: str, listen: str) -> None:
        aloop = self._aloop
        if aloop is not None:
            aloop.call_soon_threadsafe(self._request, sleep, route, listen)

    def subscribe(self, listener: WakeListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def held(self, route: str, listen: str, delta: int) -> None:
        self._metrics.held_clients.labels(route, listen).inc(delta)

    # -- the control plane's side ----------------------------------------------------------
    def observe(self, routes: Mapping[ListenKey, RouteSpec]) -> None:
        """The routes of a reconcile pass: track their containers' sleep and state."""
        found: dict[str, tuple[Sleep, dict[ListenKey, str]]] = {}
        for key, spec in routes.items():
            sleep = spec.options.sleep
            if sleep is not None:
                found.setdefault(sleep.container_id, (sleep, {}))[1][key] = spec.alias
        now = time.monotonic()
        for cid, (sleep, keys) in found.items():
            box = self._boxes.get(cid)
            if box is None:
                state: State = "asleep" if sleep.asleep else "awake"
                box = self._boxes[cid] = _Box(sleep, keys, state, now)
            box.sleep, box.keys = sleep, keys
            if sleep.asleep:
                box.seen_asleep.set()
            if box.busy:
                continue
            if box.state == "awake" and sleep.asleep:
                logger.info(
                    "container %s stopped (not by labelproxy): asleep", sleep.container_name,
                    extra={"container": sleep.container_name, "action": "asleep"},
                )  # fmt: skip
                box.state = "asleep"
                self._notify(cid)
            elif box.state == "asleep" and not sleep.asleep and box.seen_asleep.is_set():
                logger.info(
                    "container %s started (not by labelproxy): awake", sleep.container_name,
                    extra={"container": sleep.container_name, "action": "awake"},
                )  # fmt: skip
                box.state, box.idle_since, box.moved = "awake", now, -1
                self._notify(cid)
        for cid in [c for c in self._boxes if c not in found]:
            del self._boxes[cid]

    def describe(self) -> dict[ListenKey, dict[str, Any]]:
        """Each sleep-enabled route's `wake` document on /routes."""
        shown = {"awake": "ready", "stopping": "stopping", "asleep": "asleep", "waking": "waking"}
        out: dict[ListenKey, dict[str, Any]] = {}
        for box in self._boxes.values():
            doc: dict[str, Any] = {
                "state": shown[box.state],
                "container": box.sleep.container_name,
                "idle_timeout": box.sleep.idle_timeout,
                "stop_method": box.sleep.stop_method,
                "wake_on": box.sleep.wake_on,
            }
            if box.error:
                doc["error"] = box.error
            for key in box.keys:
                out[key] = doc
        return out

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch the idle clocks and run the wakes and stops until cancelled."""
        self._aloop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                while True:
                    await anyio.sleep(POLL)
                    self._poll()
            finally:
                self._tg = None

    # -- idle clocks and stops -------------------------------------------------------------
    def _activity(self, box: _Box) -> tuple[int, int]:
        active = moved = 0
        for key in box.keys:
            c = self._metrics.counters(key)
            if c is not None:
                active += c.connections_active + c.udp_sessions_active
                moved += c.bytes_in + c.bytes_out
        return active, moved

    def _poll(self) -> None:
        now = time.monotonic()
        for box in list(self._boxes.values()):
            asleep = 0 if box.state == "awake" else 1
            for key, alias in box.keys.items():
                self._metrics.route_asleep.labels(alias, str(key)).set(asleep)
            if box.state != "awake" or box.busy:
                continue
            active, moved = self._activity(box)
            if active or moved != box.moved:
                box.moved = moved
                box.idle_since = now
            elif now - box.idle_since >= box.sleep.idle_timeout and self._tg is not None:
                box.busy = True
                self._tg.start_soon(self._stop, box)

    async def _stop(self, box: _Box) -> None:
        sleep = box.sleep
        idle = time.monotonic() - box.idle_since
        box.state = "stopping"  # from now on new clients are held
        try:
            if self._activity(box)[0]:  # a client came just before: stay awake
                box.state = "awake"
                box.idle_since = time.monotonic()
                self._notify(sleep.container_id)
                return
            try:
                await self._power.sleep(sleep)
            except PowerError as exc:
                again = box.error == str(exc)  # tried again after each idle_timeout: said once
                box.state, box.idle_since, box.error = "awake", time.monotonic(), str(exc)
                level = logging.ERROR if isinstance(exc, PowerRefusedError) else logging.WARNING
                level = logging.DEBUG if again else level
                logger.log(
                    level, "container %s: cannot put it to sleep: %s", sleep.container_name, exc,
                    extra={"container": sleep.container_name, "action": "sleep"},
                )  # fmt: skip
                self._notify(sleep.container_id)
                return
            box.state, box.error, box.seen_asleep = "asleep", "", anyio.Event()
            for key, alias in box.keys.items():
                self._metrics.sleeps_total.labels(alias, str(key), sleep.stop_method).inc()
            logger.info(
                "container %s asleep after %.1fs idle (%s)", sleep.container_name, idle,
                sleep.stop_method,
                extra={"container": sleep.container_name, "action": "sleep"},
            )  # fmt: skip
            self._notify(sleep.container_id)
        finally:
            box.busy = False
        if box.pending:
            box.pending = False
            self._begin_wake(box)

    # -- wakes -----------------------------------------------------------------------------
    def _request(self, sleep: Sleep, route: str, listen: str) -> None:
        box = self._boxes.get(sleep.container_id)
        if box is None:  # a client came before the first pass observed the container
            state: State = "asleep" if sleep.asleep else "awake"
            box = self._boxes[sleep.container_id] = _Box(sleep, {}, state, time.monotonic())
            if sleep.asleep:
                box.seen_asleep.set()
        if box.state == "stopping":
            box.pending = True
            if not box.trigger[0]:
                box.trigger = (route, listen)
        elif box.state == "asleep" and not box.busy:
            box.trigger = (route, listen)
            self._begin_wake(box)

    def _begin_wake(self, box: _Box) -> None:
        if self._tg is None:
            return
        box.busy, box.state, box.failed = True, "waking", ""
        box.began = time.monotonic()
        if not box.trigger[0]:
            key, alias = next(iter(box.keys.items()), (None, "-"))
            box.trigger = (alias, str(key) if key is not None else "-")
        self._notify(box.sleep.container_id)
        self._tg.start_soon(self._wake, box)

    async def _wake(self, box: _Box) -> None:
        sleep = box.sleep
        route, listen = box.trigger
        result = "ok"
        try:
            with anyio.move_on_after(SETTLE):  # a stop just made: let discovery see it
                await box.seen_asleep.wait()
            try:
                for dependency in await self._power.dependencies(sleep):
                    await self._power.start(dependency)
                await self._power.start(sleep.container_id)
            except PowerError as exc:
                result = "refused" if isinstance(exc, PowerRefusedError) else "error"
                box.state, box.failed, box.error = "asleep", str(exc), str(exc)
                logger.error(
                    "route %s: cannot wake container %s: %s", route, sleep.container_name, exc,
                    extra={"route": route, "listen": listen, "container": sleep.container_name,
                           "action": "wake"},
                )  # fmt: skip
                return
            box.error = ""
            ready = await self._wait_ready(box, deadline=box.began + sleep.wake_timeout)
            took = time.monotonic() - box.began
            box.state, box.idle_since, box.moved = "awake", time.monotonic(), -1
            if ready:
                self._metrics.wake_duration.observe(took)
                logger.info(
                    "route %s: woke container %s in %.2fs", route, sleep.container_name, took,
                    extra={"route": route, "listen": listen, "container": sleep.container_name,
                           "action": "wake"},
                )  # fmt: skip
            else:
                result = "timeout"
                logger.error(
                    "route %s: container %s started but not ready within wake_timeout %gs",
                    route, sleep.container_name, sleep.wake_timeout,
                    extra={"route": route, "listen": listen, "container": sleep.container_name,
                           "action": "wake"},
                )  # fmt: skip
        finally:
            box.busy, box.trigger = False, ("", "")
            self._metrics.wakes_total.labels(route, listen, result).inc()
            self._notify(sleep.container_id)

    async def _wait_ready(self, box: _Box, *, deadline: float) -> bool:
        """Until a backend of the container's routes is ready, or the deadline."""
        while True:
            if any(self._health.ready_backends(key) for key in box.keys):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with anyio.move_on_after(min(left, 1.0)):
                key = next(iter(box.keys), None)
                if key is not None:
                    await self._health.wait_ready(key, timeout=min(left, 1.0))

    def _notify(self, container_id: str) -> None:
        for listener in list(self._listeners):
            listener(container_id)
