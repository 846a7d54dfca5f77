"""From an admitted TCP client to a connected upstream, in data-loop callbacks (no task).

`Connector` holds an admitted client (a raw socket fd) until its relay starts. `proceed()`
first runs the connection's steps (`Step`s: the hold for a ready backend, `hold.py`; see
"Room to grow" below), then picks the backend among the ready ones (`LiveRoute.pick_backend`)
and dials the route's ready backends in order, the picked one first: a non-blocking
`connect_ex`, the socket added to the TCP data loop, the connect timeout kept in the
listener's `Deadlines` (one timer for all dials in flight). The first backend that accepts
wins: the connector starts the `relay.Relay` and hands the connection over to it
(`Owner.handed_over`). When no backend is left, or on `abort`, it
closes the client and tells its listener (`Owner.ended`), with the reason in
`conn.close_reason` (`no_backend`, `loop`, `dial_error`, `upstream_error`, ...); the route
counts dials and refusals (`LiveRoute.dialed`, `dial_failed`, `release`).

Every dial is reported to the health checker (`shared.health`): a failure (refused,
timeout, reset before the relay) is passive evidence that may eject the backend, a success
resets its count. When every backend failed, the backends still ready are dialled once more
after `RETRY_DELAY` if that fits in the connect timeout: the client has sent nothing that
could be lost, and a backend restarting gets a moment.

A dial error is a connect that failed: an upstream that accepted and then reset the
connection before the relay began ends it as `upstream_error`, like a reset during the
relay. Addresses are resolved before: IP literals directly (`literal_addresses`), host
names by the setup task (`setup`); a backend whose name did not resolve counts as a failed
dial. An address that is one of labelproxy's own listeners (`shared.OwnListeners`) is never
dialled (each hop would dial the next): the next backend is tried, and a connection left
with none is refused with reason `loop`.

Room to grow: a `Step` is called with the connector before the backend is picked. It
returns True to go on at once, or False when it parked the connector: it then calls
`proceed()` again later (or `abort(reason)`), on the data loop. The connector stays in its
listener's connections meanwhile, so a drain waits for it and a shutdown aborts it. A hold
(wait for a woken container or a ready backend, up to the connect timeout) or a peek
(read the TLS ClientHello or a game handshake before choosing the backend) is one such
step, in a module of its own, listed by `server.TcpServer._steps_of`.
Everything here runs on the data loop.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping

from labelproxy.spec import Backend
from labelproxy.streams.addresses import literal_family
from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.tcp.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, WRITABLE
from labelproxy.streams.tcp.owner import Owner
from labelproxy.streams.tcp.relay import Relay

logger = logging.getLogger(__name__)

Address = tuple[socket.AddressFamily, tuple[str, int]]
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
_FAILED = EPOLLERR | EPOLLHUP
# SO_ERROR of a connection that was established and then reset (a refused connect is
# ECONNREFUSED): the dial itself succeeded
_RESET_AFTER_CONNECT = frozenset({errno.ECONNRESET, errno.EPIPE})
# after every backend failed, the one more round of dials waits this long (at most a quarter
# of the connect timeout): a program restarting or a listen backlog full gets a moment
RETRY_DELAY = 0.25


def literal_address(backend: Backend) -> Address | None:
    """(family, sockaddr) of a backend whose host is an IP literal; None for a hostname."""
    family = literal_family(backend.host)
    return None if family is None else (family, (backend.host, backend.port))


def literal_addresses(backends: Iterable[Backend]) -> dict[Backend, Address] | None:
    """Each backend's socket address when all are IP literals, else None (task path)."""
    addrs: dict[Backend, Address] = {}
    for backend in backends:
        addr = literal_address(backend)
        if addr is None:
            return None
        addrs[backend] = addr
    return addrs


def _address_of(backend: Backend, addrs: Mapping[Backend, Address | None]) -> Address | None:
    """`backend`'s address from those known when the client came, else (a backend that came
    with a spec update while the client was held) its IP literal; None: did not resolve."""
    if backend in addrs:
        return addrs[backend]
    return literal_address(backend)


class Connector:
    """(data loop) One admitted client (a raw socket fd it owns until the relay starts), on
    its way through its steps and the dials of its backends."""

    __slots__ = (
        "_addrs",
        "_looped",
        "_order",
        "_retried",
        "_sock",
        "_started",
        "_steps",
        "client",
        "conn",
        "done",
        "owner",
        "prefix",
        "read",
        "sniff",
    )

    def __init__(
        self,
        owner: Owner,
        client: int,
        conn: ConnInfo,
        addrs: Mapping[Backend, Address | None],
        *,
        prefix: bytes,
        sniff: bool,
        read: bool = False,
        steps: tuple[Step, ...] = (),
    ) -> None:
        self.owner = owner
        self.client = client
        self.conn = conn
        self._addrs = addrs
        self._steps = steps
        self._order: list[tuple[Backend, Address | None]] | None = None
        self.prefix = prefix
        self.read = read  # the client sent data already read (a peeked name, PROXY sniff)
        self.sniff = sniff
        self._sock: _socket.socket | None = None
        self._started = 0.0
        self._looped = False  # the last backend tried is one of our own listeners
        self._retried = False  # every backend failed once and was tried again
        self.done = False

    def proceed(self) -> None:
        """Run the steps left (one may park the connector and call this again later), pick
        the backend, dial the next backend of the order (a failed dial calls this again);
        call from the loop, never from inside an event dispatch."""
        owner = self.owner
        live = owner.live
        while self._steps:
            step, self._steps = self._steps[0], self._steps[1:]
            if not step(self) or self.done:
                return
        order = self._order
        if order is None:
            first = live.pick_backend(self.conn.client[0])
            if first is None:
                self._give_up("no_backend")
                return
            addrs = self._addrs
            order = [(first, _address_of(first, addrs))]
            backends = live.ready_backends()
            if len(backends) > 1:
                order += [(b, _address_of(b, addrs)) for b in backends if b != first]
            self._order = order
        while order and not self.done:
            backend, address = order.pop(0)
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
        if self.done:
            return
        if self._looped:
            self._give_up("loop")
        elif not self._retry_later():
            self._give_up("dial_error")

    def _retry_later(self) -> bool:
        """Every backend failed: the client has sent nothing that could be lost yet, so pick
        again (among the backends still ready) once more after a short delay, if that fits
        in the connect timeout; False when it does not."""
        if self._retried:
            return False
        live = self.owner.live
        delay = min(RETRY_DELAY, live.connect_timeout / 4)
        if time.monotonic() - self.conn.started + delay >= live.connect_timeout:
            return False
        self._retried = True
        self._order = None
        self.owner.loop.call_later(delay, self._retry)
        return True

    def _retry(self) -> None:
        if not self.done:
            logger.debug("route %s: dialling again after failed dials", self.conn.route)
            self.proceed()

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
        self.owner.loop.call_soon(self.proceed)  # not inside this dispatch (fd reuse)

    def timed_out(self) -> None:
        """The connect deadline passed (called by `Deadlines`): try the next backend."""
        if self.done:
            return
        self._drop_socket()
        self._dial_error("timeout")
        self.proceed()

    def _connected(self, events: int) -> None:
        sock = self._sock
        assert sock is not None
        self._sock = None
        owner = self.owner
        owner.deadlines.discard(self)
        self.done = True
        live = owner.live
        live.dialed(time.monotonic() - self._started)
        health = live.shared.health
        if health is not None and self.conn.backend is not None:
            health.report_dial_success(live.spec.key, self.conn.backend)
        relay = Relay(owner, self.client, sock.detach(), self.conn, prefix=self.prefix,
                      sniff=self.sniff)  # fmt: skip
        owner.handed_over(self, relay)
        relay.start(upstream_events=events)

    def _reset_after_connect(self, why: str) -> None:
        """The connect succeeded and the upstream reset the connection before the relay
        began: an upstream error of this connection (as in the relay), not a failed dial,
        and not retried on another backend (the relay would not either)."""
        live = self.owner.live
        live.dialed(time.monotonic() - self._started)
        self._drop_socket()
        logger.debug("route %s: upstream %s reset: %s", self.conn.route, self.conn.backend, why)
        self._report_failure(self.conn.backend, why)
        self._give_up("upstream_error")

    def _dial_error(self, why: str) -> None:
        backend = self.conn.backend
        self.conn.backend = None
        self._looped = False
        self.owner.live.dial_failed(self.conn, backend, why)
        self._report_failure(backend, why)

    def _report_failure(self, backend: Backend | None, why: str) -> None:
        """Passive evidence for the health checker: enough failed dials in a row eject it."""
        live = self.owner.live
        health = live.shared.health
        if health is not None and backend is not None:
            health.report_dial_failure(live.spec.key, backend, why=why)

    def _drop_socket(self) -> None:
        sock = self._sock
        self.owner.deadlines.discard(self)
        if sock is not None:
            self._sock = None
            self.owner.loop.forget(sock.fileno())
            sock.close()

    def _give_up(self, reason: str) -> None:
        """Close the client and tell the listener: this connection is over."""
        self.done = True
        if not self.conn.close_reason:
            self.conn.close_reason = reason
        os.close(self.client)
        self.owner.ended(self)

    def abort(self, reason: str) -> None:
        """Give up (drain deadline, shutdown): close the client (idempotent)."""
        if self.done:
            return
        self._drop_socket()
        self._give_up(reason)


Step = Callable[[Connector], bool]
