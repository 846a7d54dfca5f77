"""The TCP listener of one route: bind, accept, admit, dial, relay, drain.

`serve_tcp(live)` binds `live.spec.key` (raising OSError before "started" when it cannot) on
the caller's asyncio loop, then hands the listener to the TCP data loop (`dataloop`): its own
thread and epoll, where accept -> hooks (`live.admit`: ACL, cap, metrics) -> backend pick ->
`dialer.Connector` (non-blocking connect with failover, deadlines on one timer) ->
`relay.Relay` all run as callbacks, with no task and no asyncio handle per connection
(backing off on EMFILE/ENFILE/ENOBUFS/ENOMEM, never dying on them). Where a coroutine is
simpler, a short setup task on the asyncio loop does the waiting part (`tcp_setup`): a trusted
client's PROXY header is read first, or a hostname backend is resolved; then it hands the
client back to the data loop, which admits and dials it like any other. An idle connection
costs two socket fds, a few small objects and two epoll entries. It needs epoll and eventfd
(Linux); elsewhere `serve_tcp` raises OSError, like a bind failure.

On `live.close()` the listening socket closes at once (`live.listener_closed`), live
connections get `live.drain_timeout` seconds to end, the rest are closed, `live.finished`.
Cancelled from outside, everything closes promptly and the events are set too. Each closed
connection logs one INFO record on `labelproxy.access`.

Threads: methods marked "(data loop)" run on the data loop's thread and are the only ones
that touch connections or count; `run`, `_start_setup` and the setup tasks run on the
asyncio loop and reach the data loop through `DataLoop.submit` / `DataLoop.call`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

import anyio
import anyio.abc

from labelproxy.spec import Backend, ListenKey, RouteSpec
from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.proxyproto import build_header
from labelproxy.streams.sockets import (
    bind_socket,
    bound_address,
    local_address,
    set_nodelay,
    set_nonblocking,
    unmap,
)
from labelproxy.streams.tcp import loop as dataloop
from labelproxy.streams.tcp.accept import Acceptor
from labelproxy.streams.tcp.dial import Address, Connector, Deadlines, literal_addresses
from labelproxy.streams.tcp.relay import Relay
from labelproxy.streams.tcp.setup import log_access, setup_task
from labelproxy.streams.tcp.splice import PipePool, splice_supported

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
    if not dataloop.available():
        raise OSError("the TCP relay needs epoll and eventfd (Linux)")
    sock = bind_socket(live.spec.key, live.spec.family)
    set_nodelay(sock)  # accepted sockets inherit TCP_NODELAY (Linux): no syscall each
    use_splice = splice_supported() if zero_copy is None else zero_copy
    loop = dataloop.shared()
    try:
        server = _TcpServer(live, sock, loop, zero_copy=use_splice)
    except BaseException:
        sock.close()
        raise
    own = ListenKey("tcp", live.spec.key.bind, bound_address(sock)[1])
    live.shared.own.add(own, live.spec.family)
    try:
        live.bound = [bound_address(sock)]
        await server.run(task_status)
    finally:
        live.shared.own.remove(own, live.spec.family)
        with anyio.CancelScope(shield=True):
            await loop.call(server.shutdown)
        live.listener_closed.set()
        live.finished.set()


class _TcpServer:
    """The listening socket, the connections in setup or relaying, and the drain."""

    def __init__(
        self, live: LiveRoute, sock: socket.socket, loop: dataloop.DataLoop, *, zero_copy: bool
    ) -> None:
        self.live = live
        self.loop = loop
        self.aloop: asyncio.AbstractEventLoop | None = None  # the asyncio side (run)
        self.acceptor = Acceptor(
            loop, sock, self._admit, name=f"route {live.spec.alias} on {live.spec.key}"
        )
        self.deadlines = Deadlines(loop)
        self.pool = PipePool() if zero_copy else None
        self.conns: set[Relay | Connector] = set()  # (data loop) dialing or relaying
        self.setups = 0  # (asyncio) setup tasks in flight (tcp_setup)
        self.tg: anyio.abc.TaskGroup | None = None
        self._setup_queue: asyncio.Queue[tuple[int, tuple[str, int], tuple[str, int]]] | None
        self._setup_queue = None
        self._empty: anyio.Event | None = None
        self._draining = False
        self._closed = False  # (data loop) shut down: nothing new is admitted
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
        self.aloop = asyncio.get_running_loop()
        self._setup_queue = asyncio.Queue()
        try:
            await self._serve(task_status)
        finally:
            self._close_queued_setups()

    async def _serve(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        live = self.live
        async with anyio.create_task_group() as tg:
            self.tg = tg
            tg.start_soon(self._spawn_setups)
            await self.loop.call(self.acceptor.start)
            logger.debug("route %s: listening on %s", live.spec.alias, live.spec.key)
            task_status.started()
            await live.closing.wait()
            await self.loop.call(self.acceptor.close)
            live.listener_closed.set()
            if self.active:
                logger.info(
                    "route %s: draining %d connections for up to %gs",
                    live.spec.alias,
                    self.active,
                    live.drain_timeout,
                )
            with anyio.move_on_after(live.drain_timeout):
                self._draining = True
                while self.active:
                    self._empty = anyio.Event()
                    if not self.active:
                        break
                    await self._empty.wait()
            tg.cancel_scope.cancel()
        await self.loop.call(self._abort_all, "drain_timeout")

    def shutdown(self) -> None:
        """(data loop) Close the listener and every connection; idempotent."""
        self._closed = True
        self.acceptor.close()
        self._abort_all("shutdown")
        self.deadlines.close()
        if self.pool is not None:
            self.pool.close()

    def _abort_all(self, reason: str) -> None:
        for conn in list(self.conns):
            conn.abort(reason)

    def settled(self) -> None:
        """A connection or setup ended: wake a drain waiting for none to be left."""
        if not self._draining or self.active or self.aloop is None:
            return
        if self.loop.in_thread():
            self.aloop.call_soon_threadsafe(self._wake_drain)
        else:
            self._wake_drain()

    def _wake_drain(self) -> None:
        if self._empty is not None:
            self._empty.set()

    # -- what the relays ask for (data loop) -----------------------------------------------
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

    # -- one connection (data loop) --------------------------------------------------------
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
            assert self.aloop is not None and self._setup_queue is not None
            self.aloop.call_soon_threadsafe(self._setup_queue.put_nowait, (client, peer, listen))
            return
        self.open(client, peer, peer, listen, rest=b"", sniff=sniff, addrs=addrs)

    def open(
        self,
        client: int,
        source: tuple[str, int],
        peer: tuple[str, int],
        dest: tuple[str, int],
        *,
        rest: bytes,
        sniff: bool,
        addrs: Mapping[Backend, Address | None],
    ) -> None:
        """(data loop) Admit a client (a non-blocking socket fd this takes over) whose
        addresses are known (`source`/`dest` from its PROXY header, else the socket's) and
        dial its backend: `addrs` holds each backend's address (None: did not resolve);
        `rest` is client data already read."""
        live = self.live
        spec = live.spec
        if self._closed:
            os.close(client)
            return
        conn = ConnInfo(spec.alias, "tcp", source, peer, dest)
        reason = live.admit(conn)
        if reason is not None:
            logger.debug("route %s: refused client %s (%s)", spec.alias, source[0], reason)
            os.close(client)
            return
        first = live.pick_backend(source[0])
        if first is None:
            live.counters.reject("no_backend")
            conn.close_reason = "no_backend"
            os.close(client)
            self.release(conn)
            return
        order = [(first, addrs.get(first))]
        if len(spec.backends) > 1:
            order += [(b, addrs.get(b)) for b in spec.backends if b != first]
        version = spec.options.proxy_protocol
        prefix = build_header(version, source, dest) + rest if version is not None else rest
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
            self.live.shared.own.learn(listen[0])  # a local address: dials to it may loop
        return peer, listen

    # -- one connection, the task path (asyncio) -------------------------------------------
    async def _spawn_setups(self) -> None:
        """Start a setup task for each client the data loop queued."""
        queue = self._setup_queue
        assert queue is not None and self.tg is not None
        while True:
            client, peer, listen = await queue.get()
            self.setups += 1
            sock = socket.socket(self._family, socket.SOCK_STREAM, 0, client)
            self.tg.start_soon(setup_task, self, sock, peer, listen)

    def _close_queued_setups(self) -> None:
        queue = self._setup_queue
        while queue is not None and not queue.empty():
            os.close(queue.get_nowait()[0])
