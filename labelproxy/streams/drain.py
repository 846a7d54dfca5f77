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

import anyio

from labelproxy.streams.live import LiveRoute

logger = logging.getLogger(__name__)


class Drain:
    """The drain of one listener (see the module docstring)."""

    __slots__ = ("_aloop", "_empty", "draining")

    def __init__(self, aloop: asyncio.AbstractEventLoop) -> None:
        self._aloop = aloop
        self._empty = asyncio.Event()  # set on the asyncio loop (thread-safe wake-up)
        self.draining = False  # (owner thread) admitting stopped

    # -- the thread that owns the connections ------------------------------------------
    def begin(self, left: int) -> None:
        """Admitting stopped with `left` connections."""
        self.draining = True
        if not left:
            self._aloop.call_soon_threadsafe(self._empty.set)

    def settled(self, left: int) -> None:
        """A connection ended and `left` are still open."""
        if self.draining and not left:
            self._aloop.call_soon_threadsafe(self._empty.set)

    # -- asyncio -----------------------------------------------------------------------
    async def wait(self, live: LiveRoute, left: int, *, what: str) -> bool:
        """Wait until `begin`/`settled` saw none left, at most until the drain deadline.
        True: drained; False: the deadline came first."""
        if left:
            logger.info(
                "route %s: draining %d %s for up to %gs",
                live.spec.alias,
                left,
                what,
                live.drain_timeout,
                extra={"route": live.spec.alias, "listen": str(live.spec.key), "action": "drain"},
            )
        with anyio.move_on_after(live.drain_timeout) as scope:
            live.drain_scope = scope
            try:
                await self._empty.wait()
            finally:
                live.drain_scope = None
        return not scope.cancelled_caught
