"""The TCP data plane's own event loop: one thread, one edge-triggered epoll, no asyncio.

Every TCP listener, connection and dial lives here, not on the asyncio loop the control plane
runs on: a relay's wake-up is `epoll_wait` -> `target.on_event(fd, events)` -> `readv`/`write`,
with no event-loop handle, no nested poll and no coroutine in between (a Python relay cannot
afford the microseconds those cost per message). Sockets are added once with
IN|OUT|RDHUP|ET (listeners level-triggered) and leave the set when closed; `targets` maps
each fd to its `Target`.

The API is the small asyncio-like subset the relay code uses, callable only from this
thread: `time`, `call_soon`, `call_at`, `call_later` (cancellable `Timer`s on a heap), `add`,
`remove`, `forget`. Other threads hand work over with `submit(fn, *args)` (an eventfd wakes
the loop) or, from a coroutine, `await call(fn, *args)` for the result.

Threads: the control plane never touches a TCP connection; it swaps a route's spec and hooks
(atomic attribute stores) and reads counters, while everything that counts or mutates
per-connection state runs on this thread, so no lock is needed and no update is lost.
Objects that live on this loop (listeners' connections, dials, relays, timers) say "(data
loop)" in their docstrings, and the loop checks it: in debug mode (not `python -O`) its
loop-thread-only methods assert that they run on its thread (`owns_thread`). `shared()` is
the process's loop, started on first use. Linux only (epoll, eventfd). (A little over 300
lines: the dispatch, the timers and the hand-over from other threads are one loop.)
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import os
import select
import threading
import time
from _thread import get_ident
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

EPOLLIN: int = getattr(select, "EPOLLIN", 1)
EPOLLOUT: int = getattr(select, "EPOLLOUT", 4)
EPOLLERR: int = getattr(select, "EPOLLERR", 8)
EPOLLHUP: int = getattr(select, "EPOLLHUP", 16)
EPOLLRDHUP: int = getattr(select, "EPOLLRDHUP", 0x2000)
EPOLLET: int = getattr(select, "EPOLLET", 1 << 31)

MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
READABLE = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
WRITABLE = EPOLLOUT | EPOLLHUP | EPOLLERR
HANGUP = EPOLLRDHUP | EPOLLHUP | EPOLLERR

_MAX_EVENTS = 1024
_COMPACT_AT = 256  # cancelled timers kept on the heap before it is rebuilt without them


def available() -> bool:
    """True when this platform has what the loop needs (epoll, eventfd)."""
    return hasattr(select, "epoll") and hasattr(os, "eventfd")


class Target(Protocol):
    def on_event(self, fd: int, events: int) -> None: ...

    def abort(self, reason: str) -> None: ...


def _nothing() -> None:
    """What a cancelled timer would run."""


class Timer:
    """A callback scheduled on the loop; `cancel()` it until it has run."""

    __slots__ = ("_args", "_fn", "_heap", "cancelled", "when")

    def __init__(
        self,
        when: float,
        fn: Callable[..., object],
        args: tuple[Any, ...],
        heap: DataLoop | None = None,
    ) -> None:
        self.when = when  # the loop's time it is due at
        self._fn = fn
        self._args = args
        self._heap = heap  # the loop whose timer heap holds it (None: a call_soon)
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._fn, self._args = _nothing, ()  # it may sit on the heap a while: hold nothing
            if self._heap is not None:
                self._heap.timer_cancelled()


class DataLoop:
    """An epoll loop on a thread of its own (see the module docstring)."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self.targets: dict[int, Target] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake, EPOLLIN)
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled_seen = 0
        self._seq = itertools.count()
        self._ready: deque[Timer] = deque()
        self._inbox: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._thread: threading.Thread | None = None
        self._ident = -1  # the loop thread's id, once it runs
        self._stop = False
        self._bad_deadline_logged = False

    # -- any thread --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="labelproxy-tcp", daemon=True)
            self._thread.start()

    def owns_thread(self) -> bool:
        """True on the loop's own thread (the only one that may touch its connections)."""
        return get_ident() == self._ident

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` on the loop's thread, soon (thread-safe)."""
        self._inbox.append((fn, args))
        with contextlib.suppress(BlockingIOError):  # counter full: a wake-up is pending
            os.eventfd_write(self._wake, 1)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """From a coroutine on another thread's asyncio loop: run `fn(*args)` on this
        loop's thread and return its result (or raise its exception)."""
        aloop = asyncio.get_running_loop()
        future: asyncio.Future[T] = aloop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if future.done():
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def work() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller
                aloop.call_soon_threadsafe(settle, False, exc)
            else:
                aloop.call_soon_threadsafe(settle, True, result)

        self.submit(work)
        return await future

    def stop(self) -> None:
        """Ask the thread to end (it closes nothing: connections are aborted by their
        listeners first) and wait for it."""
        thread = self._thread
        if thread is None:
            return
        self._stop = True
        self.submit(lambda: None)
        if thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None

    # -- the loop's own thread -----------------------------------------------------------
    def time(self) -> float:
        return time.monotonic()

    def call_soon(self, fn: Callable[..., object], *args: Any) -> Timer:
        if __debug__:
            assert get_ident() == self._ident, "DataLoop.call_soon off the loop thread"
        timer = Timer(0.0, fn, args)
        self._ready.append(timer)
        return timer

    def call_at(self, when: float, fn: Callable[..., object], *args: Any) -> Timer:
        if __debug__:
            assert get_ident() == self._ident, "DataLoop.call_at off the loop thread"
        if not math.isfinite(when):
            return self._unschedulable(when, fn, args)
        timer = Timer(when, fn, args, self)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def _unschedulable(
        self, when: float, fn: Callable[..., object], args: tuple[Any, ...]
    ) -> Timer:
        """A NaN deadline compares false with every other: on the heap it would sit at the
        top and no timer of any route would fire again. Validation keeps such values out;
        should one get through anyway, it stays off the heap: NaN or +inf never fires (no
        deadline), -inf runs at once."""
        if not self._bad_deadline_logged:
            self._bad_deadline_logged = True
            logger.error("timer with a non-finite deadline (%r) for %r not put on the heap",
                         when, fn)  # fmt: skip
        if when < 0:
            return self.call_soon(fn, *args)
        return Timer(when, fn, args)

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> Timer:
        return self.call_at(time.monotonic() + delay, fn, *args)

    def add(self, fd: int, target: Target, mask: int = MASK) -> None:
        """Watch `fd` for `target` until it is closed (or `remove`d)."""
        if __debug__:
            assert get_ident() == self._ident, "DataLoop.add off the loop thread"
        self._ep.register(fd, mask)
        self.targets[fd] = target

    def remove(self, fd: int) -> None:
        """Stop watching an fd that stays open (a listener backing off, or closing)."""
        if __debug__:
            assert get_ident() == self._ident, "DataLoop.remove off the loop thread"
        self.targets.pop(fd, None)
        with contextlib.suppress(OSError):
            self._ep.unregister(fd)

    def forget(self, fd: int) -> None:
        """Stop dispatching `fd` (call right before closing it: closing leaves the set)."""
        if __debug__:
            assert get_ident() == self._ident, "DataLoop.forget off the loop thread"
        self.targets.pop(fd, None)

    def _run(self) -> None:
        self._ident = get_ident()
        poll = self._ep.poll
        targets = self.targets
        wake = self._wake
        timers = self._timers
        ready = self._ready
        inbox = self._inbox
        while not self._stop:
            if ready or inbox:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            else:
                timeout = -1.0
            try:
                events = poll(timeout, _MAX_EVENTS)
            except InterruptedError:
                continue
            for fd, mask in events:
                target = targets.get(fd)
                if target is not None:
                    try:
                        target.on_event(fd, mask)
                    except Exception:
                        logger.exception("relay callback failed")
                        with contextlib.suppress(Exception):
                            target.abort("internal_error")
                elif fd == wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(wake)
            target = None  # the loop waits next: hold no connection in its locals
            if inbox:
                self._run_inbox()
            if timers and timers[0][0] <= time.monotonic():
                self._run_timers()
            if ready:
                self._run_ready()
        with contextlib.suppress(OSError):
            self._ep.close()
        with contextlib.suppress(OSError):
            os.close(wake)

    def _run_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            self._guarded(fn, args)

    def _run_ready(self) -> None:
        ready = self._ready
        for _ in range(len(ready)):
            timer = ready.popleft()
            if not timer.cancelled:
                self._guarded(timer._fn, timer._args)

    def _run_timers(self) -> None:
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if timer.cancelled:
                self._cancelled_seen -= 1
                continue
            timer.cancelled = True  # ran: a late cancel() is a no-op
            timer._heap = None
            self._guarded(timer._fn, timer._args)

    def timer_cancelled(self) -> None:
        """A timer on the heap was cancelled. When cancelled ones crowd the heap (an idle
        timeout of an hour on short connections would keep one per connection for that
        hour), rebuild it without them."""
        if __debug__:
            assert get_ident() == self._ident, "Timer.cancel off the loop thread"
        self._cancelled_seen += 1
        timers = self._timers
        if self._cancelled_seen >= _COMPACT_AT and self._cancelled_seen * 2 > len(timers):
            live = [entry for entry in timers if not entry[2].cancelled]
            heapq.heapify(live)
            timers[:] = live
            self._cancelled_seen = 0

    @staticmethod
    def _guarded(fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("data-plane callback %r failed", fn)


class _Shared:
    loop: DataLoop | None = None
    lock = threading.Lock()


def shared() -> DataLoop:
    """The process's TCP data-plane loop, started on first use."""
    with _Shared.lock:
        if _Shared.loop is None:
            _Shared.loop = DataLoop()
            _Shared.loop.start()
        return _Shared.loop
