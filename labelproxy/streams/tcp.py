"""The TCP listener of one route: bind, accept, admit, dial, relay, drain.

`serve_tcp(live)` binds `live.spec.key` (raising OSError before "started" when it cannot)
and accepts in batches from an event-loop reader callback (backing off on EMFILE/ENFILE/
ENOBUFS/ENOMEM, never dying on them). The common path has no task per connection: accept ->
hooks (`live.admit`: ACL, cap, metrics) -> backend pick -> a `dialer.Connector` (non-blocking
connect with failover, timeout as a timer) -> `relay.Relay`, all in loop callbacks, every
socket watched by the listener's edge-triggered `Poller`. Where a coroutine is simpler, a
short setup task does the same steps (`tcp_setup`): a trusted client's PROXY header must be
read first, or a backend is a hostname to resolve. An idle connection costs two socket
fds, a few small objects and two epoll entries. It needs epoll (Linux); elsewhere
`serve_tcp` raises OSError, like a bind failure.

On `live.close()` the listening socket closes at once (`live.listener_closed`), live
connections get `live.drain_timeout` seconds to end, the rest are closed, `live.finished`.
Cancelled from outside, everything closes promptly and the events are set too. Each closed
connection logs one INFO record on `labelproxy.access`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import anyio
import anyio.abc

from labelproxy.spec import Backend, RouteSpec
from labelproxy.streams.accept import Acceptor
from labelproxy.streams.dialer import Address, Connector, Deadlines, literal_addresses
from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.poller import Poller
from labelproxy.streams.poller import available as poller_available
from labelproxy.streams.proxyproto import build_header
from labelproxy.streams.relay import Relay
from labelproxy.streams.route import LiveRoute
from labelproxy.streams.sockets import (
    bind_socket,
    bound_address,
    local_address,
    set_nodelay,
    set_nonblocking,
    unmap,
)
from labelproxy.streams.splice import PipePool, splice_supported
from labelproxy.streams.tcp_setup import log_access, setup_task

logger = logging.getLogger(__name__)

_UNSPECIFIED = frozenset({"0.0.0.0", "::"})


async def serve_tcp(
    live: LiveRoute,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    zero_copy: bool | None = None,
) -> None:
    """Serve `live`'s TCP listener until it is closed and drained (or this task is cancelled).

    `zero_copy`: None splices bulk transfers where the platform can; False only copies.
    """
    if not poller_available():
        raise OSError("the TCP relay needs epoll (Linux)")
    sock = bind_socket(live.spec.key, live.spec.family)
    set_nodelay(sock)  # accepted sockets inherit TCP_NODELAY (Linux): no syscall each
    use_splice = splice_supported() if zero_copy is None else zero_copy
    try:
        server = _TcpServer(live, sock, zero_copy=use_splice)
    except BaseException:
        sock.close()
        raise
    try:
        live.bound = [bound_address(sock)]
        await server.run(task_status)
    finally:
        server.shutdown()


class _TcpServer:
    """The listening socket, the connections in setup or relaying, and the drain."""

    def __init__(self, live: LiveRoute, sock: socket.socket, *, zero_copy: bool) -> None:
        self.live = live
        self.loop = asyncio.get_running_loop()
        self.acceptor = Acceptor(
            self.loop, sock, self._admit, name=f"route {live.spec.alias} on {live.spec.key}"
        )
        self.poller = Poller(self.loop)
        self.deadlines = Deadlines(self.loop)
        self.pool = PipePool() if zero_copy else None
        self.conns: set[Relay | Connector] = set()  # dialing or relaying, for drain/abort
        self.setups = 0  # setup tasks (tcp_setup)
        self.tg: anyio.abc.TaskGroup | None = None
        self._empty: anyio.Event | None = None
        self._spec_seen: RouteSpec | None = None
        self._addrs: dict[Backend, Address] | None = None
        self._last_listen: tuple[str, int] = ("", 0)
        bound = bound_address(sock)
        self._family = sock.family
        fixed = sock.family == socket.AF_INET and bound[0] not in _UNSPECIFIED
        self._fixed_listen = bound if fixed else None

    @property
    def active(self) -> int:
        return self.setups + len(self.conns)

    async def run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        live = self.live
        async with anyio.create_task_group() as tg:
            self.tg = tg
            self.acceptor.start()
            logger.debug("route %s: listening on %s", live.spec.alias, live.spec.key)
            task_status.started()
            await live.closing.wait()
            self._close_listener()
            if self.active:
                logger.info(
                    "route %s: draining %d connections for up to %gs",
                    live.spec.alias,
                    self.active,
                    live.drain_timeout,
                )
            with anyio.move_on_after(live.drain_timeout):
                while self.active:
                    self._empty = anyio.Event()
                    await self._empty.wait()
            tg.cancel_scope.cancel()
        self._abort_all("drain_timeout")

    def shutdown(self) -> None:
        self._close_listener()
        self._abort_all("shutdown")
        self.deadlines.close()
        self.poller.close()
        if self.pool is not None:
            self.pool.close()
        self.live.finished.set()

    def _close_listener(self) -> None:
        self.acceptor.close()
        self.live.listener_closed.set()

    def _abort_all(self, reason: str) -> None:
        for conn in list(self.conns):
            conn.abort(reason)

    def settled(self) -> None:
        if self._empty is not None and not self.active:
            self._empty.set()

    # -- what the relays ask for -----------------------------------------------------------
    def relay_done(self, relay: Relay) -> None:
        self.conns.discard(relay)
        conn = relay.conn
        if conn.close_reason == "proxy_header":
            self.live.counters.reject("proxy_header")
        self.release(conn)
        self.settled()

    def release(self, conn: ConnInfo) -> None:
        self.live.release(conn)
        log_access(conn)

    # -- one connection, the callback path -------------------------------------------------
    def _admit(self, client: int, peer_addr: tuple[str, int]) -> None:
        live = self.live
        set_nonblocking(client)
        listen = self._fixed_listen
        if listen is not None:
            peer = peer_addr
        else:
            peer, listen = self.addresses(client, peer_addr)
        spec = live.spec
        addrs = self._addrs if spec is self._spec_seen else self._addresses_of(spec)
        sniff = False
        if live.edge.accept_proxy_protocol != "off":
            trusted = live.trusted_proxies is not None and live.trusted_proxies.permits(peer[0])
            if trusted:  # its PROXY header is read first: the task path
                addrs = None
            sniff = True
        if addrs is None:
            self._spawn(client, peer, listen)
            return
        conn = ConnInfo(spec.alias, "tcp", peer, peer, listen)
        reason = live.admit(conn)
        if reason is not None:
            logger.debug("route %s: refused client %s (%s)", spec.alias, peer[0], reason)
            os.close(client)
            return
        first = live.pick_backend(peer[0])
        if first is None:
            live.counters.reject("no_backend")
            conn.close_reason = "no_backend"
            os.close(client)
            self.release(conn)
            return
        order = [(first, addrs[first])]
        if len(spec.backends) > 1:
            order += [(b, addrs[b]) for b in spec.backends if b != first]
        version = spec.options.proxy_protocol
        prefix = build_header(version, peer, listen) if version is not None else b""
        connector = Connector(self, client, conn, order, prefix=prefix, sniff=sniff)
        self.conns.add(connector)
        connector.start()

    def _addresses_of(self, spec: RouteSpec) -> dict[Backend, Address] | None:
        if spec is not self._spec_seen:
            self._spec_seen = spec
            self._addrs = literal_addresses(spec.backends)
        return self._addrs

    def connected(self, connector: Connector, upstream: int, events: int) -> None:
        self.conns.discard(connector)
        relay = Relay(
            self,
            connector.client,
            upstream,
            connector.conn,
            prefix=connector.prefix,
            sniff=connector.sniff,
        )
        self.conns.add(relay)
        if logger.isEnabledFor(logging.DEBUG):
            conn = relay.conn
            logger.debug("route %s: %s -> %s open", conn.route, conn.client[0], conn.backend)
        relay.start(upstream_events=events)

    def failed(self, connector: Connector) -> None:
        self.conns.discard(connector)
        os.close(connector.client)
        self.release(connector.conn)
        self.settled()

    def addresses(
        self, client: int, peer_addr: tuple[str, int]
    ) -> tuple[tuple[str, int], tuple[str, int]]:
        """(client, listener) addresses, IPv4-mapped ones unwrapped; the listener tuple is
        shared between connections that hit the same address (idle connections stay small)."""
        if self._fixed_listen is not None:
            return peer_addr, self._fixed_listen
        if self._family == socket.AF_INET6:
            peer = (unmap(peer_addr[0]), int(peer_addr[1]))
            name = local_address(client, self._family)
            listen = (unmap(name[0]), name[1])
        else:
            peer = (peer_addr[0], peer_addr[1])
            listen = local_address(client, self._family)
        if listen == self._last_listen:
            listen = self._last_listen
        else:
            self._last_listen = listen
        return peer, listen

    # -- one connection, the task path -----------------------------------------------------
    def _spawn(self, client: int, peer: tuple[str, int], listen: tuple[str, int]) -> None:
        if self.tg is None:
            os.close(client)
            return
        self.setups += 1
        sock = socket.socket(self._family, socket.SOCK_STREAM, 0, client)
        self.tg.start_soon(setup_task, self, sock, peer, listen)

    def start_relay(
        self,
        client: socket.socket,
        upstream: socket.socket,
        conn: ConnInfo,
        *,
        prefix: bytes,
        sniff: bool,
    ) -> None:
        """Hand a task-path connection to a relay (both sockets connected)."""
        relay = Relay(self, client.detach(), upstream.detach(), conn, prefix=prefix, sniff=sniff)
        self.conns.add(relay)
        relay.start()
