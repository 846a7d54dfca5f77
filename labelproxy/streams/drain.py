"""The one drain of a listener, TCP or UDP: after it stops admitting, let what it has finish.

When a route is closed (`LiveRoute.close`), its listener stops admitting new clients (TCP:
the listening socket closes, so the port is free at once; UDP: datagrams from new sources
are dropped, while the socket stays bound because the replies of the existing sessions
leave through it). Then `drain` waits until none of its connections or sessions is left,
for at most `live.drain_timeout` seconds (a later `live.close(t)` brings the deadline
closer, `close(0)` ends the drain now), and the listener ends what is left with reason
`drain_timeout`. A TCP connection finishes when both sides closed; a UDP session when it
is idle for the route's `idle_timeout` (traffic either way keeps it).

Threads: the connections are counted on the thread that owns them (TCP: the data loop;
UDP: the asyncio loop). That thread calls `Drain.begin(left)` once, when admitting stops,
and `Drain.settled(left)` whenever a connection ends; the wait itself runs on the asyncio
loop, woken thread-safely when `left` reaches zero.
"""

from __future__ import annotations

import asyncio
import logging

from labelproxy.streams.live import LiveRoute

logger = logging.getLogger(__name__)


class Drain:
    """The drain of one listener (see the module docstring)."""

    __slots__ = ("_aloop", "_done", "_drained", "_timer", "draining")

    def __init__(self, aloop: asyncio.AbstractEventLoop) -> None:
        self._aloop = aloop
        self._done: asyncio.Event | None = None  # (asyncio) drained or deadline; in `wait`
        self._drained = False
        self._timer: asyncio.TimerHandle | None = None
        self.draining = False  # (owner thread) admitting stopped

    # -- the thread that owns the connections ------------------------------------------
    def begin(self, left: int) -> None:
        """Admitting stopped with `left` connections."""
        self.draining = True
        if not left:
            self._aloop.call_soon_threadsafe(self._empty)

    def settled(self, left: int) -> None:
        """A connection ended and `left` are still open."""
        if self.draining and not left:
            self._aloop.call_soon_threadsafe(self._empty)

    # -- asyncio -----------------------------------------------------------------------
    async def wait(self, live: LiveRoute, left: int, *, what: str) -> bool:
        """Wait until `begin`/`settled` saw none left, at most until the drain deadline.
        True: drained; False: the deadline came first. (The deadline is a loop timer that
        sets the same event: the normal way out cancels nothing.)"""
        if left:
            logger.info(
                "route %s: draining %d %s for up to %gs",
                live.spec.alias,
                left,
                what,
                live.drain_timeout,
                extra={"route": live.spec.alias, "listen": str(live.spec.key), "action": "drain"},
            )
        done = self._done = asyncio.Event()
        if self._drained:
            return True
        self.expire_in(live.drain_timeout)
        live.drain_deadline = self.expire_in
        try:
            await done.wait()
        finally:
            live.drain_deadline = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        return self._drained

    def expire_in(self, timeout: float) -> None:
        """End the wait within `timeout` seconds (never later than an earlier deadline)."""
        due = self._aloop.time() + timeout
        timer = self._timer
        if timer is None or due < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = self._aloop.call_at(due, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._done is not None:
            self._done.set()

    def _empty(self) -> None:
        self._drained = True
        if self._done is not None:
            self._done.set()
