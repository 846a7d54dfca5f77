"""Plain `tcp` checks of IP-literal backends (the default check), all on one loop's thread.

A check is a few system calls: a non-blocking connect, the socket watched for writability,
`SO_ERROR`, a close. Run as a task per backend on the asyncio loop it
also cost a task wake-up, cancel scopes and a limiter round trip (0.4 ms of CPU a check); run
from one asyncio task it still cost the relay more than its own CPU: every wake-up of the
control plane's thread took the interpreter lock from the TCP data loop (1,000 checked routes,
200 checks a second: +28% user CPU per relayed connection, 0.88x `Connection: close`
requests/s). So `TcpBatch` runs every default check on a loop given to it, and the runtime
gives it the TCP data loop: there a check runs between two relay events, and the lock never
changes hands for it. A checker without a data loop (on its own, as in tests) drives the batch
from its asyncio loop through `AsyncioCheckLoop`.

    batch = TcpBatch(on_results=fn, own=lambda: lookup, slots=CheckSlots(64))
    batch.attach(loop)                            # a CheckLoop: the data loop, or the adapter
    job = batch.job(key, route, backend, check)   # a TcpJob: `cancel()`, `wake()` (any thread)
    batch.schedule(job, delay)                    # its next check (any thread)
    batch.detach()                                # closes what is in flight (any thread)

`on_results([(job, ProbeResult)])` is called on the loop's thread, once per finished check;
it reschedules each job it keeps (one check in flight per job: a job is not scheduled while
its check runs). Each check in flight holds one of `slots`, the checker's cap shared with its
other probes; when none is free the others wait their turn (`CheckSlots.notify`).
Results and details are those of `probes.probe` for a `tcp` check (`connected`, `Connection
refused`, `no answer within 2s`, `loop: ...`).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from labelproxy.health.probes import OwnLookup, ProbeResult, describe_os_error, literal_family
from labelproxy.health.slots import CheckSlots
from labelproxy.healthcheck import HealthCheck, render_seconds
from labelproxy.spec import Backend, ListenKey

logger = logging.getLogger(__name__)

WINDOW = 0.05  # checks due this much later start now (at most a quarter of their interval)
WRITABLE = select.EPOLLOUT  # a connect settles: writable, or an error / hang-up
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class FdTarget(Protocol):
    def on_event(self, fd: int, events: int) -> None: ...

    def abort(self, reason: str) -> None: ...


class CheckLoop(Protocol):
    """What the batch needs of a loop (the TCP data loop's API, a subset): `submit` from any
    thread, the rest on the loop's thread only."""

    def owns_thread(self) -> bool: ...

    def submit(self, fn: Callable[..., object], *args: Any) -> None: ...

    def call_at(self, when: float, fn: Callable[..., object], *args: Any) -> Cancellable: ...

    def add(self, fd: int, target: FdTarget, mask: int) -> None: ...

    def forget(self, fd: int) -> None:
        """Stop dispatching `fd`, which the caller closes right after."""


class AsyncioCheckLoop:
    """A `CheckLoop` over an asyncio loop (a checker without a data loop). Make it on that
    loop's thread."""

    def __init__(self, aloop: asyncio.AbstractEventLoop) -> None:
        self._aloop = aloop
        self._ident = threading.get_ident()

    def owns_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        self._aloop.call_soon_threadsafe(fn, *args)

    def call_at(self, when: float, fn: Callable[..., object], *args: Any) -> Cancellable:
        return self._aloop.call_later(max(0.0, when - time.monotonic()), fn, *args)

    def add(self, fd: int, target: FdTarget, mask: int) -> None:
        self._aloop.add_writer(fd, target.on_event, fd, mask)

    def forget(self, fd: int) -> None:
        self._aloop.remove_writer(fd)  # asyncio's selector must let go before the close


def batchable(check: HealthCheck, backend: Backend) -> bool:
    """True for a `tcp` check of an IP-literal backend (names are resolved per check)."""
    return check.kind == "tcp" and literal_family(backend.host) is not None


class TcpJob:
    """The checks of one backend of one route; `route` is the checker's record of it."""

    __slots__ = ("_batch", "backend", "check", "done", "key", "route", "token")

    def __init__(self, batch: TcpBatch, key: ListenKey, route: Any, backend: Backend,
                 check: HealthCheck) -> None:
        self._batch = batch
        self.key, self.route, self.backend, self.check = key, route, backend, check
        self.token = 0  # (loop thread) which heap entry is the live one; -1: in flight
        self.done = False

    @property
    def scope(self) -> TcpJob:
        """Like a `_Watcher`'s: `job.scope.cancel()` ends the job."""
        return self

    def cancel(self) -> None:
        """(any thread) No more checks; a result in flight is dropped."""
        self.done = True

    def wake(self) -> None:
        """(any thread) Check at once, unless a check is in flight (its result reschedules
        the job)."""
        if not self.done:
            self._batch.schedule(self, 0.0, unless_in_flight=True)


class _Flight:
    """(loop thread) One check in flight: its socket is watched by the loop until it
    settles or its timeout fires."""

    __slots__ = ("batch", "deadline", "job", "loop", "sock", "started")

    def __init__(self, batch: TcpBatch, loop: CheckLoop, job: TcpJob, sock: _socket.socket,
                 started: float) -> None:
        self.batch, self.loop, self.job, self.sock, self.started = batch, loop, job, sock, started
        self.deadline: Cancellable | None = None

    def on_event(self, fd: int, events: int) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.batch._land(self, _result(err, time.monotonic() - self.started))

    def abort(self, reason: str) -> None:
        self.batch._land(self, ProbeResult("fail", reason, 0.0))

    def timed_out(self) -> None:
        detail = f"no answer within {render_seconds(self.job.check.timeout)}"
        self.deadline = None
        self.batch._land(self, ProbeResult("timeout", detail, time.monotonic() - self.started))


class TcpBatch:
    """See the module docstring."""

    def __init__(
        self,
        *,
        on_results: Callable[[list[tuple[TcpJob, ProbeResult]]], None],
        own: Callable[[], OwnLookup | None],
        slots: CheckSlots,
    ) -> None:
        self._on_results = on_results
        self._own = own
        self._slots = slots
        self._loop: CheckLoop | None = None
        self._heap: list[tuple[float, int, TcpJob]] = []  # (loop thread) due, token, job
        self._seq = itertools.count(1)
        self._flights: dict[int, _Flight] = {}  # (loop thread) fd -> check in flight
        self._timer: Cancellable | None = None  # (loop thread) the next start, when armed
        self._timer_at = 0.0
        self._blocked = False  # (loop thread) every slot taken: a slot given back starts more

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def job(self, key: ListenKey, route: Any, backend: Backend, check: HealthCheck) -> TcpJob:
        return TcpJob(self, key, route, backend, check)

    # -- any thread ------------------------------------------------------------------------
    def attach(self, loop: CheckLoop) -> None:
        """Run the checks on `loop` from now on (those scheduled already included)."""
        self._loop = loop
        loop.submit(self._arm)

    def detach(self) -> None:
        """Stop: close the checks in flight (their results are dropped); jobs scheduled stay
        on the heap for the next `attach`."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.submit(self._shut, loop)

    def schedule(self, job: TcpJob, delay: float, *, unless_in_flight: bool = False) -> None:
        """The next check of `job`, `delay` seconds from now (replacing any other)."""
        due = time.monotonic() + delay
        loop = self._loop
        if loop is not None and loop.owns_thread():
            self._push(job, due, unless_in_flight)
        elif loop is not None:
            loop.submit(self._push, job, due, unless_in_flight)
        else:  # not running: kept until attached (no loop thread to race with)
            self._push(job, due, unless_in_flight)

    # -- the loop's thread -----------------------------------------------------------------
    def _push(self, job: TcpJob, due: float, unless_in_flight: bool) -> None:
        if job.done or (unless_in_flight and job.token < 0):
            return
        job.token = next(self._seq)
        heapq.heappush(self._heap, (due, job.token, job))
        if self._timer is None or due < self._timer_at:
            self._wake_at(due)

    def _wake_at(self, when: float) -> None:
        """Start checks from a timer at `when`: never inside the dispatch of a socket's event,
        where a descriptor just closed (by the relay too) may come back as a new check's while
        the old one's event is still to be dispatched."""
        loop = self._loop
        if loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._fire)

    def _arm(self) -> None:
        """(a timer, or the loop's inbox) Start what is due, then set the timer for the next
        start."""
        loop = self._loop
        if loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        heap = self._heap
        now = time.monotonic()
        self._blocked = False
        while heap:
            due, token, job = heap[0]
            if job.done or token != job.token:
                heapq.heappop(heap)
                continue
            if due > now + min(WINDOW, job.check.interval / 4):
                self._wake_at(due)
                return
            if not self._slots.try_take():
                self._blocked = True
                self._slots.notify(self._slot_freed)  # then go on
                return
            heapq.heappop(heap)
            job.token = -1  # in flight: not scheduled until its result
            self._start(loop, job, now)

    def _fire(self) -> None:
        self._timer = None
        self._arm()

    def _slot_freed(self) -> None:
        """(any thread) A slot was given back while checks waited for one."""
        loop = self._loop
        if loop is not None:
            loop.submit(self._unblock)

    def _unblock(self) -> None:
        if self._blocked:
            self._blocked = False
            self._wake_at(time.monotonic())

    def _start(self, loop: CheckLoop, job: TcpJob, now: float) -> None:
        host, port = job.backend.host, job.backend.port
        own = self._own()
        listener = own("tcp", host, port) if own is not None else None
        if listener is not None:
            detail = f"loop: {host}:{port} is labelproxy's own listener {listener} (not dialled)"
            self._slots.give()
            self._report(job, ProbeResult("fail", detail, 0.0))
            return
        family = literal_family(host) or socket.AF_INET
        try:
            sock = _socket.socket(family, _STREAM_NONBLOCK)  # (no Python __init__)
        except OSError as exc:
            self._slots.give()
            self._report(job, ProbeResult("fail", describe_os_error(exc), 0.0))
            return
        try:
            err = sock.connect_ex((host, port))
        except OSError as exc:
            err = exc.errno or errno.EINVAL
        if err != errno.EINPROGRESS:
            sock.close()
            self._slots.give()
            self._report(job, _result(err, 0.0))
            return
        flight = _Flight(self, loop, job, sock, now)
        fd = sock.fileno()
        try:
            loop.add(fd, flight, WRITABLE)
        except OSError as exc:
            sock.close()
            self._slots.give()
            self._report(job, ProbeResult("fail", describe_os_error(exc), 0.0))
            return
        self._flights[fd] = flight
        flight.deadline = loop.call_at(now + job.check.timeout, flight.timed_out)

    def _land(self, flight: _Flight, result: ProbeResult) -> None:
        """A check settled (connected, failed or timed out): close it, report it, and start
        the next that waited for its slot."""
        fd = flight.sock.fileno()
        if self._flights.pop(fd, None) is not flight:
            return
        flight.loop.forget(fd)  # closed next: the close takes it out of an epoll set
        if flight.deadline is not None:
            flight.deadline.cancel()
        flight.sock.close()
        self._slots.give()  # if the batch waited for one, it goes on (`_slot_freed`)
        self._report(flight.job, result)

    def _report(self, job: TcpJob, result: ProbeResult) -> None:
        job.token = 0  # no longer in flight
        if job.done:
            return
        try:
            self._on_results([(job, result)])
        except Exception:
            logger.exception("recording a health check's result failed")

    def _shut(self, loop: CheckLoop) -> None:
        self._blocked = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fd, flight in list(self._flights.items()):
            loop.forget(fd)
            if flight.deadline is not None:
                flight.deadline.cancel()
            flight.sock.close()
            self._slots.give()
            flight.job.token = 0
        self._flights.clear()


def _result(err: int, duration: float) -> ProbeResult:
    if err == 0:
        return ProbeResult("pass", "connected", duration)
    return ProbeResult("fail", os.strerror(err), duration)
