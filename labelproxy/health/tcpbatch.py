"""Plain `tcp` checks of IP-literal backends (the default check), many in one task.

A check per backend per task costs the event loop a task wake-up, two cancel scopes, a
limiter round trip and an awaited socket each time: about 0.4 ms of CPU, so 1,000 routes of
default checks (200 a second) took 8% of a core and the GIL the relay's data loop shares.
`TcpBatch` runs them all from one task instead: the checks due within a small window start
together (non-blocking connects), one private epoll (awaited as one readable descriptor, with
an eventfd to be woken) says which finished, and the results are handed over as one batch.

    batch = TcpBatch(limiter=limiter, on_results=fn, own=lambda: lookup)
    task_group.start_soon(batch.run)
    job = batch.job(key, route, backend, check)   # a TcpJob: `cancel()`, `wake()`
    batch.schedule(job, delay)                    # its next check, `delay` seconds from now

`on_results([(job, ProbeResult), ...])` is called on the event loop; it reschedules each job
it keeps (one check in flight per job: a job is not scheduled while its check runs). Each
check holds one token of the shared `limiter` while in flight (the checker's total cap).
Results and details are those of `probes.probe` for a `tcp` check (`connected`, `Connection
refused`, `no answer within 2s`, `loop: ...`).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from labelproxy.health.probes import (
    OwnLookup,
    ProbeResult,
    describe_os_error,
    literal_family,
    reset_close,
)
from labelproxy.healthcheck import HealthCheck, render_seconds
from labelproxy.spec import Backend, ListenKey

logger = logging.getLogger(__name__)

WINDOW = 0.05  # checks due this much later start now (at most a quarter of their interval)
BLOCKED_RETRY = 0.01  # every limiter token taken: look again this much later
IDLE_WAIT = 3600.0  # nothing due: sleep until woken


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
        self.token = 0  # which heap entry is the live one
        self.done = False

    @property
    def scope(self) -> TcpJob:
        """Like a `_Watcher`'s: `job.scope.cancel()` ends the job."""
        return self

    def cancel(self) -> None:
        self.done = True

    def wake(self) -> None:
        """Check at once (unless a check is in flight: its result reschedules the job)."""
        if not self.done and self.token >= 0:
            self._batch.schedule(self, 0.0)


class TcpBatch:
    """See the module docstring."""

    def __init__(
        self,
        *,
        limiter: anyio.CapacityLimiter,
        on_results: Callable[[list[tuple[TcpJob, ProbeResult]]], None],
        own: Callable[[], OwnLookup | None],
    ) -> None:
        self._limiter = limiter
        self._on_results = on_results
        self._own = own
        self._heap: list[tuple[float, int, int, TcpJob]] = []
        self._seq = itertools.count()
        # fd -> (job, socket, started, deadline)
        self._pending: dict[int, tuple[TcpJob, socket.socket, float, float]] = {}
        self._finished: list[tuple[TcpJob, ProbeResult]] = []  # decided without waiting
        self._ep: select.epoll | None = None
        self._efd = -1
        self._sleeping_until = 0.0  # while the task waits: when it wakes by itself

    def job(self, key: ListenKey, route: Any, backend: Backend, check: HealthCheck) -> TcpJob:
        return TcpJob(self, key, route, backend, check)

    def schedule(self, job: TcpJob, delay: float) -> None:
        """The next check of `job`, `delay` seconds from now (replacing any other)."""
        due = time.monotonic() + delay
        job.token = next(self._seq)
        heapq.heappush(self._heap, (due, job.token, job.token, job))
        if self._sleeping_until and due < self._sleeping_until and self._efd >= 0:
            os.eventfd_write(self._efd, 1)  # wake the task to start it in time
            self._sleeping_until = 0.0

    async def run(self) -> None:
        """Until cancelled: start the checks that are due, collect their results."""
        self._ep = select.epoll()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._efd, select.EPOLLIN)
        try:
            while True:
                now = time.monotonic()
                blocked = self._start_due(now)
                wait = self._wait(now, blocked=blocked)
                if wait > 0 and not self._finished:
                    self._sleeping_until = now + wait
                    with anyio.move_on_after(wait):
                        await anyio.wait_readable(self._ep.fileno())
                    self._sleeping_until = 0.0
                else:
                    await anyio.lowlevel.checkpoint()
                done = self._harvest(time.monotonic())
                if done:
                    self._on_results(done)
        finally:
            for job, sock, _, _ in self._pending.values():
                sock.close()
                self._limiter.release_on_behalf_of(job)
            self._pending.clear()
            self._ep.close()
            os.close(self._efd)
            self._ep, self._efd = None, -1

    def _start_due(self, now: float) -> bool:
        """Start every check due (within the window); True when the limiter stopped it."""
        heap = self._heap
        while heap:
            due, _, token, job = heap[0]
            if due > now + min(WINDOW, job.check.interval / 4):
                return False
            if job.done or token != job.token:
                heapq.heappop(heap)
                continue
            try:
                self._limiter.acquire_on_behalf_of_nowait(job)
            except anyio.WouldBlock:
                return True
            heapq.heappop(heap)
            job.token = -1  # in flight: not scheduled until its result
            self._start(job, now)
        return False

    def _start(self, job: TcpJob, now: float) -> None:
        host, port = job.backend.host, job.backend.port
        own = self._own()
        listener = own("tcp", host, port) if own is not None else None
        if listener is not None:
            detail = f"loop: {host}:{port} is labelproxy's own listener {listener} (not dialled)"
            self._finish(job, ProbeResult("fail", detail, 0.0))
            return
        family = literal_family(host) or socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self._finish(job, ProbeResult("fail", describe_os_error(exc), 0.0))
            return
        try:
            err = sock.connect_ex((host, port))
        except OSError as exc:
            err = exc.errno or errno.EINVAL
        if err == errno.EINPROGRESS and self._ep is not None:
            self._ep.register(sock.fileno(), select.EPOLLOUT)
            self._pending[sock.fileno()] = (job, sock, now, now + job.check.timeout)
            return
        if err == 0:
            reset_close(sock)
        else:
            sock.close()
        self._finish(job, _result(err, 0.0))

    def _finish(self, job: TcpJob, result: ProbeResult) -> None:
        self._limiter.release_on_behalf_of(job)
        self._finished.append((job, result))

    def _wait(self, now: float, *, blocked: bool) -> float:
        wake = now + IDLE_WAIT
        if self._heap:  # then every check due within the window starts with it
            wake = min(wake, self._heap[0][0])
        for _, _, _, deadline in self._pending.values():
            wake = min(wake, deadline)
        wait = max(0.0, wake - now)
        return min(wait, BLOCKED_RETRY) if blocked else wait

    def _harvest(self, now: float) -> list[tuple[TcpJob, ProbeResult]]:
        assert self._ep is not None
        for fd, _ in self._ep.poll(0):
            if fd == self._efd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._efd)
                continue
            entry = self._pending.pop(fd, None)
            if entry is None:
                continue
            job, sock, started, _ = entry
            self._ep.unregister(fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                reset_close(sock)  # connected: reset, as `probes` does (no TIME_WAIT)
            else:
                sock.close()
            self._finish(job, _result(err, now - started))
        for fd, (job, sock, started, deadline) in list(self._pending.items()):
            if now >= deadline:
                del self._pending[fd]
                self._ep.unregister(fd)
                sock.close()
                detail = f"no answer within {render_seconds(job.check.timeout)}"
                self._finish(job, ProbeResult("timeout", detail, now - started))
        done, self._finished = self._finished, []
        return [(job, result) for job, result in done if not job.done]


def _result(err: int, duration: float) -> ProbeResult:
    if err == 0:
        return ProbeResult("pass", "connected", duration)
    return ProbeResult("fail", os.strerror(err), duration)
