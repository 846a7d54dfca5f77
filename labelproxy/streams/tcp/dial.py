"""Dialing a connection's upstream from data-loop callbacks (no task per connection).

`Connector` tries the route's backends in order (the picked one first): a non-blocking
`connect_ex`, the socket added to the TCP data loop (`dataloop`), the connect timeout kept
in the listener's `Deadlines` (one timer for all dials in flight, not a handle each). The
first backend that accepts wins and the connector hands the socket to its owner
(`connected`), which starts the relay; when every backend failed, or on `abort`, it tells
the owner (`failed`), which closes the client and releases the connection. A dial error is
a connect that failed: an upstream that accepted and then reset the connection before the
relay began ends it as `upstream_error`, like a reset during the relay. Every dial of
every connection goes through here, with one accounting: in-flight per backend, dial
errors, the dial histogram, the error log.

Addresses are resolved before: IP literals directly (`literal_address`), host names by the
setup task (`tcp_setup`); a backend whose name did not resolve counts as a failed dial. An
address that is one of labelproxy's own listeners (`shared.OwnListeners`) is never dialled
(each hop would dial the next): the next backend is tried, and a connection left with none
is refused with reason `loop`.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import Protocol

from labelproxy.spec import Backend
from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.tcp.loop import (
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    WRITABLE,
    DataLoop,
    Timer,
)

logger = logging.getLogger(__name__)

Address = tuple[socket.AddressFamily, tuple[str, int]]
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
_FAILED = EPOLLERR | EPOLLHUP
# SO_ERROR of a connection that was established and then reset (a refused connect is
# ECONNREFUSED): the dial itself succeeded
_RESET_AFTER_CONNECT = frozenset({errno.ECONNRESET, errno.EPIPE})


def literal_address(backend: Backend) -> Address | None:
    """(family, sockaddr) of a backend whose host is an IP literal; None for a hostname."""
    host = backend.host
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, (host, backend.port)


def literal_addresses(backends: Iterable[Backend]) -> dict[Backend, Address] | None:
    """Each backend's socket address when all are IP literals, else None (task path)."""
    addrs: dict[Backend, Address] = {}
    for backend in backends:
        addr = literal_address(backend)
        if addr is None:
            return None
        addrs[backend] = addr
    return addrs


class Deadlines:
    """The connect deadlines of a listener's dials in flight, served by one timer.

    `add` and `discard` are a dict store and a dict pop; the timer is armed for the earliest
    deadline and, when it fires, times out every dial past its deadline and re-arms."""

    __slots__ = ("_due", "_loop", "_timer")

    def __init__(self, loop: DataLoop) -> None:
        self._loop = loop
        self._due: dict[Connector, float] = {}
        self._timer: Timer | None = None

    def add(self, connector: Connector, timeout: float) -> None:
        due = self._loop.time() + timeout
        self._due[connector] = due
        timer = self._timer
        if timer is None or due < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(due, self._fire)

    def discard(self, connector: Connector) -> None:
        self._due.pop(connector, None)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        late = [c for c, due in self._due.items() if due <= now]
        for connector in late:
            del self._due[connector]
        for connector in late:
            connector.timed_out()  # may dial the next backend: add() again
        if self._due and self._timer is None:
            self._timer = self._loop.call_at(min(self._due.values()), self._fire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()


class Owner(Protocol):
    loop: DataLoop
    live: LiveRoute
    deadlines: Deadlines

    def connected(self, connector: Connector, upstream: int, events: int) -> None: ...

    def failed(self, connector: Connector) -> None: ...


class Connector:
    """Connects one admitted client (a raw socket fd) to the first backend of `order` that
    answers."""

    __slots__ = (
        "_looped",
        "_order",
        "_sock",
        "_started",
        "addresses",
        "client",
        "conn",
        "done",
        "owner",
        "prefix",
        "sniff",
    )

    def __init__(
        self,
        owner: Owner,
        client: int,
        conn: ConnInfo,
        order: list[tuple[Backend, Address | None]],
        *,
        prefix: bytes,
        sniff: bool,
    ) -> None:
        self.owner = owner
        self.client = client
        self.conn = conn
        self._order = order
        self.prefix = prefix
        self.sniff = sniff
        self._sock: _socket.socket | None = None
        self._started = 0.0
        self._looped = False  # the last backend tried is one of our own listeners
        self.done = False

    def start(self) -> None:
        """Dial the next backend; call from the loop (never from inside an event dispatch)."""
        owner = self.owner
        live = owner.live
        while self._order and not self.done:
            backend, address = self._order.pop(0)
            self.conn.backend = backend
            live.backend_opened(backend)
            self._started = time.monotonic()
            if address is None:
                self._dial_error("the host name did not resolve")
                continue
            family, addr = address
            own = live.shared.own
            if addr[1] in own.tcp and own.refuse(
                "tcp", addr[0], addr[1], route=self.conn.route, backend=backend
            ):
                live.backend_closed(backend)  # not dialled: each hop would dial the next
                self.conn.backend = None
                self._looped = True
                continue
            try:  # SOCK_NONBLOCK: born non-blocking, no extra syscall; the C socket type
                sock = _socket.socket(family, _STREAM_NONBLOCK)  # (no Python __init__)
            except OSError as exc:
                self._dial_error(exc.strerror or str(exc))
                continue
            try:  # noqa: SIM105 (hot path: no context manager)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            err = sock.connect_ex(addr)
            if err == 0:
                self._sock = sock
                owner.loop.add(sock.fileno(), self)
                self._connected(EPOLLIN | EPOLLOUT)
                return
            if err != errno.EINPROGRESS:
                sock.close()
                self._dial_error(os.strerror(err))
                continue
            self._sock = sock
            owner.loop.add(sock.fileno(), self)
            owner.deadlines.add(self, live.connect_timeout)
            return
        if not self.done:
            self.done = True
            if self._looped:
                self.conn.close_reason = "loop"
                live.counters.reject("loop")
            else:
                self.conn.close_reason = "dial_error"
            owner.failed(self)

    def on_event(self, fd: int, events: int) -> None:
        sock = self._sock
        if self.done or sock is None or not events & WRITABLE:
            return
        if not events & _FAILED:  # writable and no error: connected (no SO_ERROR syscall)
            self._connected(events)
            return
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._connected(events)
            return
        if err in _RESET_AFTER_CONNECT:
            self._reset_after_connect(os.strerror(err))
            return
        self._drop_socket()
        self._dial_error(os.strerror(err))
        self.owner.loop.call_soon(self.start)  # not inside this dispatch (fd reuse)

    def timed_out(self) -> None:
        """The connect deadline passed (called by `Deadlines`): try the next backend."""
        if self.done:
            return
        self._drop_socket()
        self._dial_error("timeout")
        self.start()

    def _connected(self, events: int) -> None:
        sock = self._sock
        assert sock is not None
        self._sock = None
        self.owner.deadlines.discard(self)
        self.done = True
        self.owner.live.counters.observe_dial(time.monotonic() - self._started)
        self.owner.connected(self, sock.detach(), events)

    def _reset_after_connect(self, why: str) -> None:
        """The connect succeeded and the upstream reset the connection before the relay
        began: an upstream error of this connection (as in the relay), not a failed dial,
        and not retried on another backend (the relay would not either)."""
        self.owner.live.counters.observe_dial(time.monotonic() - self._started)
        self._drop_socket()
        self.done = True
        self.conn.close_reason = "upstream_error"
        logger.debug("route %s: upstream %s reset: %s", self.conn.route, self.conn.backend, why)
        self.owner.failed(self)

    def _dial_error(self, why: str) -> None:
        live = self.owner.live
        backend = self.conn.backend
        if backend is not None:
            live.backend_closed(backend)
        self.conn.backend = None
        self._looped = False
        live.counters.dial_errors += 1
        logger.error("route %s: dial %s failed: %s", self.conn.route, backend, why)

    def _drop_socket(self) -> None:
        sock = self._sock
        self.owner.deadlines.discard(self)
        if sock is not None:
            self._sock = None
            self.owner.loop.forget(sock.fileno())
            sock.close()

    def abort(self, reason: str) -> None:
        """Give up (drain deadline, shutdown): the owner closes the client (idempotent)."""
        if self.done:
            return
        self.done = True
        self._drop_socket()
        if not self.conn.close_reason:
            self.conn.close_reason = reason
        self.owner.failed(self)
