"""The one contract between a TCP listener and the connections it owns.

`server.TcpServer` implements `Owner`; a connection in its dial (`dial.Connector`) or relay
(`relay.Relay`) gets its listener as an `Owner` and needs nothing else from it: the data
loop it runs on, the route (`LiveRoute`: spec, timeouts, policy, accounting), the listener's
pipe pool and dial deadlines, and two calls back. The connections implement `Owned`.

    Connector --handed_over(connector, relay)--> TcpServer   (the upstream answered)
    Connector / Relay --ended(self)-->           TcpServer   (its sockets are closed)

This module exists so that neither side imports the other's module for its types (no
cycle, not even for type checking): the server imports `dial` and `relay`, they import
this. Everything here runs on the data loop (`loop.DataLoop`).
"""

from __future__ import annotations

from typing import Protocol

from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.tcp.deadlines import Deadlines
from labelproxy.streams.tcp.loop import DataLoop
from labelproxy.streams.tcp.splice import PipePool


class Owned(Protocol):
    """(data loop) One connection of a listener, dialing or relaying."""

    conn: ConnInfo

    def on_event(self, fd: int, events: int) -> None: ...

    def abort(self, reason: str) -> None:
        """End it now (drain deadline, shutdown): close its sockets, tell `ended`."""


class Owner(Protocol):
    """(data loop) What a TCP listener gives the connections it owns."""

    loop: DataLoop
    live: LiveRoute
    pool: PipePool | None  # pipes for splicing; None: copy only
    deadlines: Deadlines  # the connect deadlines of the listener's dials

    def handed_over(self, old: Owned, new: Owned) -> None:
        """`old` (a dial) became `new` (its relay), which owns the sockets now."""

    def ended(self, owned: Owned) -> None:
        """`owned` is over, its sockets closed: release it (count, log, drain)."""
