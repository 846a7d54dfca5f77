"""Plain `tcp` checks of IP-literal backends (the default check), all on one loop's thread.

A check is a few system calls: a non-blocking connect, `SO_ERROR`, a close. Run as a task per
backend on the asyncio loop it also cost a task wake-up, cancel scopes and a limiter round
trip (0.4 ms of CPU a check); run from one asyncio task it still cost the relay more than its
own CPU: every wake-up of the control plane's thread took the interpreter lock from the TCP
data loop (1,000 checked routes, 200 checks a second: +28% user CPU per relayed connection,
0.88x `Connection: close` requests/s). So `TcpBatch` runs every default check on a loop given
to it, and the runtime gives it the TCP data loop: there a check runs between two relay
events, and the lock never changes hands for it. And it wakes that loop seldom, since every
wake of it takes the lock from the UDP relay on the event loop: the sockets in flight are
watched by a private epoll the batch looks at once a tick (`TICK`) while any is in flight,
never by the loop's own; checks due within a tick start together and land at a later tick.
200 checks a second are ~20 wakes. A checker without a
data loop (on its own, as in tests) drives the batch from its asyncio loop through
`AsyncioCheckLoop`.

    batch = TcpBatch(on_results=fn, own=lambda: lookup, slots=CheckSlots(64))
    batch.attach(loop)                            # a CheckLoop: the data loop, or the adapter
    job = batch.job(key, route, backend, check)   # a TcpJob: `cancel()`, `wake()` (any thread)
    batch.schedule(job, delay)                    # its next check (any thread)
    batch.detach()                                # closes what is in flight (any thread)

`on_results([(job, ProbeResult), ...])` is called on the loop's thread, once a tick with the
checks that finished in it;
it reschedules each job it keeps (one check in flight per job: a job is not scheduled while
its check runs). Each check in flight holds one of `slots`, the checker's cap shared with its
other probes; when none is free the others wait their turn (`CheckSlots.notify`). Results
and details are those of `probes.probe` for a `tcp` check (`connected`, `Connection refused`,
`no answer within 2s`, `loop: ...`); durations and timeouts are seen to a tick.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
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

TICK = 0.05  # checks due this much later start now; checks in flight are looked at this often
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class CheckLoop(Protocol):
    """What the batch needs of a loop (the TCP data loop's API, a subset): `submit` from any
    thread, the rest on the loop's thread only."""

    def owns_thread(self) -> bool: ...

    def submit(self, fn: Callable[..., object], *args: Any) -> None: ...

    def call_at(self, when: float, fn: Callable[..., object], *args: Any) -> Cancellable: ...


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
    """(loop thread) One check in flight: its socket, in the batch's private epoll."""

    __slots__ = ("deadline", "job", "sock", "started")

    def __init__(self, job: TcpJob, sock: _socket.socket, started: float) -> None:
        self.job, self.sock, self.started = job, sock, started
        self.deadline = started + job.check.timeout


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
        self._ep: select.epoll | None = None  # (loop thread) the sockets in flight
        self._heap: list[tuple[float, int, TcpJob]] = []  # (loop thread) due, token, job
        self._seq = itertools.count(1)
        self._flights: dict[int, _Flight] = {}  # (loop thread) fd -> check in flight
        self._timer: Cancellable | None = None  # (loop thread) the next tick, when armed
        self._timer_at = 0.0
        self._blocked = False  # (loop thread) every slot taken: a slot given back goes on
        self._done: list[tuple[TcpJob, ProbeResult]] = []  # (loop thread) this tick's results

    def job(self, key: ListenKey, route: Any, backend: Backend, check: HealthCheck) -> TcpJob:
        return TcpJob(self, key, route, backend, check)

    # -- any thread ------------------------------------------------------------------------
    def attach(self, loop: CheckLoop) -> None:
        """Run the checks on `loop` from now on (those scheduled already included)."""
        self._loop = loop
        loop.submit(self._open, loop)

    def detach(self) -> None:
        """Stop: close the checks in flight (their results are dropped); jobs scheduled stay
        on the heap for the next `attach`."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.submit(self._shut)

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
    def _open(self, loop: CheckLoop) -> None:
        if self._loop is loop and self._ep is None:
            self._ep = select.epoll()
            self._tick()

    def _push(self, job: TcpJob, due: float, unless_in_flight: bool) -> None:
        if job.done or (unless_in_flight and job.token < 0):
            return
        job.token = next(self._seq)
        heapq.heappush(self._heap, (due, job.token, job))
        if self._timer is None or due < self._timer_at:
            self._wake_at(due)

    def _wake_at(self, when: float) -> None:
        """The next tick at `when` (replacing a later one)."""
        loop = self._loop
        if loop is None or self._ep is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._tick()

    def _tick(self) -> None:
        """Land what settled, start what is due, then set the next tick: in a tick while
        checks are in flight, else when one is due."""
        if self._loop is None or self._ep is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._harvest()
        self._start_due()
        if self._done:  # one hand-over (one lock) per tick
            done, self._done = self._done, []
            try:
                self._on_results(done)
            except Exception:
                logger.exception("recording health checks' results failed")
        after = time.monotonic() + TICK
        if self._flights:
            self._wake_at(after)
        elif self._heap and not self._blocked:
            self._wake_at(max(after - TICK, self._heap[0][0]))

    def _start_due(self) -> None:
        """Start every check due within a tick (a quarter of its interval at most), while a
        slot is free."""
        heap, now = self._heap, time.monotonic()
        self._blocked = False
        while heap:
            due, token, job = heap[0]
            if job.done or token != job.token:
                heapq.heappop(heap)
                continue
            if due > now + min(TICK, job.check.interval / 4):
                break
            if not self._slots.try_take():
                self._blocked = True
                self._slots.notify(self._slot_freed)  # then go on
                break
            heapq.heappop(heap)
            job.token = -1  # in flight: not scheduled until its result
            self._start(job, now)

    def _slot_freed(self) -> None:
        """(any thread) A slot was given back while checks waited for one."""
        loop = self._loop
        if loop is not None:
            loop.submit(self._unblock)

    def _unblock(self) -> None:
        if self._blocked:
            self._blocked = False
            self._wake_at(time.monotonic())

    def _start(self, job: TcpJob, now: float) -> None:
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
        if err == errno.EINPROGRESS and self._ep is not None:
            try:
                self._ep.register(sock.fileno(), select.EPOLLOUT)
            except OSError as exc:
                err = exc.errno or errno.EINVAL
            else:
                self._flights[sock.fileno()] = _Flight(job, sock, now)
                return
        sock.close()
        self._slots.give()
        self._report(job, _result(err, 0.0))

    def _harvest(self) -> None:
        """Land the checks whose connect settled, and those past their timeout."""
        assert self._ep is not None
        now = time.monotonic()
        for fd, _ in self._ep.poll(0):
            flight = self._flights.get(fd)
            if flight is not None:
                err = flight.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == errno.ECONNRESET:  # connected, then reset before this tick looked:
                    err = 0  # the handshake is what a connect check asks for (as before)
                self._land(fd, flight, _result(err, now - flight.started))
        for fd, flight in [(f, x) for f, x in self._flights.items() if now >= x.deadline]:
            detail = f"no answer within {render_seconds(flight.job.check.timeout)}"
            self._land(fd, flight, ProbeResult("timeout", detail, now - flight.started))

    def _land(self, fd: int, flight: _Flight, result: ProbeResult) -> None:
        del self._flights[fd]
        flight.sock.close()  # (which takes it out of the epoll set)
        self._slots.give()  # if the batch waited for one, it goes on (`_slot_freed`)
        self._report(flight.job, result)

    def _report(self, job: TcpJob, result: ProbeResult) -> None:
        job.token = 0  # no longer in flight
        if not job.done:
            self._done.append((job, result))  # handed over at the end of the tick

    def _shut(self) -> None:
        self._blocked = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for flight in self._flights.values():
            flight.sock.close()
            self._slots.give()
            flight.job.token = 0
        self._flights.clear()
        self._done.clear()
        if self._ep is not None:
            with contextlib.suppress(OSError):
                self._ep.close()
            self._ep = None


def _result(err: int, duration: float) -> ProbeResult:
    if err == 0:
        return ProbeResult("pass", "connected", duration)
    return ProbeResult("fail", os.strerror(err), duration)
