"""Hold a new TCP client while its route has no ready backend, up to the connect timeout.

A client that arrives while every backend of its route is still starting (a container whose
program listens a moment after it starts), down or ejected is not refused at once: `Hold.step`
(a `dial.Step`, listed by `server.TcpServer._steps_of` when the process has a health checker)
parks its `Connector`. The client's bytes wait in the kernel, the connection stays counted in
its listener (a drain waits for it, a shutdown aborts it). When a backend of the route turns
ready the checker's listener (`on_change`, any thread) hands a wake-up to the data loop
(`DataLoop.submit`), and every parked connector goes on (`proceed`: pick, dial). One still
parked after `live.connect_timeout` is refused with reason `no_backend`, as it was at once
before. A connector parked while a backend turned ready cannot miss it: every ready change
of the route is handed over, whether anyone waits or not (they are rare), and so is every
update of the route's spec (`LiveRoute.updated`: a new backend without an active check, such
as a container whose Docker HEALTHCHECK now says healthy, is ready at once, no change).

Everything here runs on the data loop, except `on_change` (the checker's thread).
"""

from __future__ import annotations

import logging

from labelproxy.health.views import StateChange
from labelproxy.spec import ListenKey
from labelproxy.streams.tcp.deadlines import Deadlines
from labelproxy.streams.tcp.dial import Connector
from labelproxy.streams.tcp.loop import DataLoop

logger = logging.getLogger(__name__)


class _Parked:
    """(data loop) One held connector's deadline (a `deadlines.Expiring`)."""

    __slots__ = ("connector", "hold")

    def __init__(self, hold: Hold, connector: Connector) -> None:
        self.hold = hold
        self.connector = connector

    def timed_out(self) -> None:
        self.hold.expired(self)


class Hold:
    """(data loop) The clients of one listener waiting for a ready backend."""

    __slots__ = ("_deadlines", "_key", "_loop", "_parked")

    def __init__(self, loop: DataLoop, deadlines: Deadlines, key: ListenKey) -> None:
        self._loop = loop
        self._deadlines = deadlines
        self._key = key
        self._parked: dict[Connector, _Parked] = {}

    def __len__(self) -> int:
        return len(self._parked)

    def step(self, connector: Connector) -> bool:
        """The `dial.Step`: go on when the route has a ready backend, else park."""
        live = connector.owner.live
        if live.ready_backends():
            return True
        parked = self._parked[connector] = _Parked(self, connector)
        self._deadlines.add(parked, live.connect_timeout)
        logger.debug(
            "route %s: no ready backend; holding client %s for up to %.1fs",
            connector.conn.route, connector.conn.client[0], live.connect_timeout,
        )  # fmt: skip
        return False

    def on_change(self, change: StateChange) -> None:
        """(any thread) The checker's listener: a backend of this route turned ready."""
        if change.ready and change.key == self._key:
            self._loop.submit(self.wake)

    def wake(self) -> None:
        """Let every parked connector go on if the route has a ready backend now."""
        if not self._parked:
            return
        first = next(iter(self._parked))
        if not first.owner.live.ready_backends():
            return
        parked, self._parked = self._parked, {}
        for connector, entry in parked.items():
            self._deadlines.discard(entry)
            if not connector.done:
                connector.proceed()

    def expired(self, entry: _Parked) -> None:
        connector = entry.connector
        if self._parked.get(connector) is not entry:
            return
        del self._parked[connector]
        if not connector.done:
            logger.info(
                "route %s: refused client %s: no backend became ready within %.1fs",
                connector.conn.route, connector.conn.client[0],
                connector.owner.live.connect_timeout,
                extra={"route": connector.conn.route, "listen": str(self._key),
                       "action": "no_backend"},
            )  # fmt: skip
            connector.abort("no_backend")

    def forget(self, owned: object) -> None:
        """`owned` (a connection of the listener) ended, perhaps while parked."""
        entry = self._parked.pop(owned, None)  # type: ignore[call-overload]
        if entry is not None:
            self._deadlines.discard(entry)
