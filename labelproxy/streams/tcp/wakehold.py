"""Hold a new TCP client while its route's container wakes, then let it dial: no reconnect.

`WakeHold.step` is a `dial.Step` (listed by `server.TcpServer._steps_of` for a route whose
options carry a `spec.Sleep`), run after admission: the ACL and caps have already passed, so
a denied client wakes nothing, and a held client counts against `max_connections`. While
the container is not awake (`wakeup.Waker.awake`) or the route has no ready backend, the
connector is parked, its bytes waiting in the kernel (nothing is read), and the waker is
asked to start the container (`request`: single flight, dependencies first, after a stop in
progress). With `wake_on: data` the request waits for the client's first byte (peeked, not
read): a port scan that connects and closes starts nothing.

Held clients go on (`proceed`: the health hold, pick, dial) when the container is awake and
a backend is ready: the waker, the health checker and every spec update say so by calling
`recheck` (any thread, handed to the data loop). At the container's `wake_timeout` they are
closed (reason `wake_timeout`, counted as a `no_backend` refusal); when the wake failed
(the engine refused the start) at once. At most `MAX_HELD` clients are held per listener;
more are refused (`limit`).

Everything here runs on the data loop, except `recheck` (any thread).
"""

from __future__ import annotations

import logging
import socket

from labelproxy.spec import ListenKey, Sleep
from labelproxy.streams.tcp.deadlines import Deadlines
from labelproxy.streams.tcp.dial import Connector
from labelproxy.streams.tcp.loop import EPOLLIN, EPOLLRDHUP, DataLoop
from labelproxy.streams.wakeup import Waker

logger = logging.getLogger(__name__)

MAX_HELD = 1024  # clients held per listener while its container wakes


class _Held:
    """(data loop) One held connector: its deadline (`deadlines.Expiring`) and, with
    `wake_on: data`, the watch on its first byte (a `loop.Target`)."""

    __slots__ = ("connector", "hold", "sleep", "watching")

    def __init__(self, hold: WakeHold, connector: Connector, sleep: Sleep) -> None:
        self.hold = hold
        self.connector = connector
        self.sleep = sleep
        self.watching = False

    def timed_out(self) -> None:
        self.hold.expired(self)

    def on_event(self, fd: int, events: int) -> None:
        self.hold.first_byte(self)

    def abort(self, reason: str) -> None:
        self.connector.abort(reason)


class WakeHold:
    """(data loop) The clients of one listener held while its container wakes."""

    __slots__ = ("_deadlines", "_key", "_loop", "_waker", "held")

    def __init__(self, loop: DataLoop, deadlines: Deadlines, key: ListenKey, waker: Waker) -> None:
        self._loop = loop
        self._deadlines = deadlines
        self._key = key
        self._waker = waker
        self.held: dict[Connector, _Held] = {}

    def step(self, connector: Connector) -> bool:
        """The `dial.Step`: go on when the container is awake and a backend ready, else hold."""
        live = connector.owner.live
        sleep = live.spec.options.sleep
        if sleep is None or self._ready(connector):
            return True
        conn = connector.conn
        if len(self.held) >= MAX_HELD:
            logger.warning(
                "route %s: refused client %s: %d clients already held while %s wakes",
                conn.route, conn.client[0], MAX_HELD, sleep.container_name,
                extra={"route": conn.route, "listen": str(self._key), "action": "limit"},
            )  # fmt: skip
            connector.abort("limit")
            return False
        entry = self.held[connector] = _Held(self, connector, sleep)
        self._deadlines.add(entry, sleep.wake_timeout)
        self._waker.held(conn.route, str(self._key), 1)
        # `wake_on: data`: wait for a byte, unless one came already (a name a shared
        # listener read, data after a PROXY header): then the client has sent data
        if (sleep.wake_on == "data" and not connector.read
                and not self._waker.awake(sleep.container_id)):  # fmt: skip
            entry.watching = True
            self._loop.add(connector.client, entry, EPOLLIN | EPOLLRDHUP)
        else:
            self._waker.request(sleep, route=conn.route, listen=str(self._key))
        logger.debug("route %s: holding client %s while %s wakes", conn.route, conn.client[0],
                     sleep.container_name)  # fmt: skip
        return False

    def _ready(self, connector: Connector) -> bool:
        live = connector.owner.live
        sleep = live.spec.options.sleep
        if sleep is None:
            return True
        return self._waker.awake(sleep.container_id) and bool(live.ready_backends())

    def recheck(self, *_: object) -> None:
        """(any thread) Something changed: look at the held clients again, on the loop."""
        self._loop.submit(self.wake)

    def wake(self) -> None:
        """Let every held connector go on if its container is awake and a backend ready;
        close them all if the wake failed."""
        if not self.held:
            return
        first = next(iter(self.held))
        sleep = first.owner.live.spec.options.sleep
        failed = "" if sleep is None else self._waker.failed(sleep.container_id)
        if not failed and not self._ready(first):
            return
        held, self.held = self.held, {}
        for connector, entry in held.items():
            self._release(entry)
            if connector.done:
                continue
            if failed:
                self._refuse(entry, f"the wake failed: {failed}", "no_backend")
            else:
                connector.proceed()

    def first_byte(self, entry: _Held) -> None:
        """(`wake_on: data`) The client sent something, or closed: wake, or forget it."""
        connector = entry.connector
        if self.held.get(connector) is not entry or not entry.watching:
            return
        self._loop.remove(connector.client)
        entry.watching = False
        try:
            with socket.socket(fileno=connector.client) as sock:
                try:
                    data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                finally:
                    sock.detach()
        except OSError:
            data = b""
        if not data:  # connected and closed: a scan, which wakes nothing
            del self.held[connector]
            self._release(entry)
            connector.abort("client_closed")
            return
        conn = connector.conn
        self._waker.request(entry.sleep, route=conn.route, listen=str(self._key))

    def expired(self, entry: _Held) -> None:
        connector = entry.connector
        if self.held.get(connector) is not entry:
            return
        del self.held[connector]
        self._release(entry)
        if not connector.done:
            self._refuse(
                entry, f"not ready within wake_timeout {entry.sleep.wake_timeout:g}s",
                "wake_timeout",
            )  # fmt: skip

    def _refuse(self, entry: _Held, why: str, reason: str) -> None:
        connector = entry.connector
        conn = connector.conn
        logger.info(
            "route %s: closed held client %s: %s", conn.route, conn.client[0], why,
            extra={"route": conn.route, "listen": str(self._key), "action": reason},
        )  # fmt: skip
        connector.abort(reason)

    def _release(self, entry: _Held) -> None:
        self._deadlines.discard(entry)
        if entry.watching:
            entry.watching = False
            self._loop.remove(entry.connector.client)
        self._waker.held(entry.connector.conn.route, str(self._key), -1)

    def forget(self, owned: object) -> None:
        """`owned` (a connection of the listener) ended, perhaps while held."""
        entry = self.held.pop(owned, None)  # type: ignore[call-overload]
        if entry is not None:
            self._release(entry)
