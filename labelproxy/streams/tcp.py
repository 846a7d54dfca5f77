"""The TCP listener of one route: bind, accept, admit, dial, relay, drain.

`serve_tcp(live)` binds `live.spec.key` (raising OSError before "started" when it cannot),
accepts in batches (backing off on EMFILE/ENFILE/ENOBUFS/ENOMEM, never dying on them) and
gives each connection a short setup task: the client's PROXY header when accepted from
trusted proxies, the hooks (`live.admit`: ACL, cap, metrics), backend choice and dial with
failover, the PROXY header for the upstream. The setup task then hands both sockets to a
callback-driven relay (zero-copy `SpliceRelay`, or the copy `Relay` where splice is missing)
and ends, so an idle connection costs two sockets and a few small objects, no coroutine.

On `live.close()` the listening socket closes at once (`live.listener_closed`), live
connections get `live.drain_timeout` seconds to end, the rest are closed, `live.finished`.
Cancelled from outside, everything closes promptly and the events are set too. Each closed
connection logs one INFO record on `labelproxy.access`.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable

import anyio
import anyio.abc

from labelproxy.streams.handshake import HeaderRefusedError, dial, read_client_header
from labelproxy.streams.hooks import ConnInfo, Hook
from labelproxy.streams.proxyproto import build_header
from labelproxy.streams.relay import Relay
from labelproxy.streams.route import LiveRoute
from labelproxy.streams.sockets import bind_socket, bound_address, set_nodelay, unmap
from labelproxy.streams.splice import PipePool, SpliceRelay, splice_supported

logger = logging.getLogger(__name__)
access_log = logging.getLogger("labelproxy.access")

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BATCH = 128
_BACKOFF_MIN, _BACKOFF_MAX = 0.01, 1.0


async def serve_tcp(
    live: LiveRoute,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    zero_copy: bool | None = None,
) -> None:
    """Serve `live`'s TCP listener until it is closed and drained (or this task is cancelled).

    `zero_copy`: None picks splice where the platform has it; False forces the copy relay.
    """
    sock = bind_socket(live.spec.key, live.spec.family)
    use_splice = splice_supported() if zero_copy is None else zero_copy
    server = _TcpServer(live, sock, zero_copy=use_splice)
    try:
        live.bound = [bound_address(sock)]
        await server.run(task_status)
    finally:
        server.shutdown()


class _TcpServer:
    """The listening socket, the connections in setup or relaying, and the drain."""

    def __init__(self, live: LiveRoute, sock: socket.socket, *, zero_copy: bool) -> None:
        self.live = live
        self.sock: socket.socket | None = sock
        self.relays: set[Relay] = set()
        self.setups = 0
        self._empty: anyio.Event | None = None
        self.pool = PipePool() if zero_copy else None
        self.hooks: Callable[[], tuple[Hook, ...]] = lambda: live.hooks
        self.tg: anyio.abc.TaskGroup | None = None
        self._last_listen: tuple[str, int] = ("", 0)

    @property
    def active(self) -> int:
        return self.setups + len(self.relays)

    async def run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        live = self.live
        assert self.sock is not None
        async with anyio.create_task_group() as conns:
            self.tg = conns
            async with anyio.create_task_group() as acceptors:
                acceptors.start_soon(self._accept_loop, self.sock)
                logger.debug("route %s: listening on %s", live.spec.alias, live.spec.key)
                task_status.started()
                await live.closing.wait()
                acceptors.cancel_scope.cancel()
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
            conns.cancel_scope.cancel()
        self._abort_all("drain_timeout")

    def shutdown(self) -> None:
        self._close_listener()
        self._abort_all("shutdown")
        if self.pool is not None:
            self.pool.close()
        self.live.finished.set()

    def _close_listener(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.live.listener_closed.set()

    def _abort_all(self, reason: str) -> None:
        for relay in list(self.relays):
            relay.abort(reason)

    def _settled(self) -> None:
        if self._empty is not None and not self.active:
            self._empty.set()

    # -- accept ----------------------------------------------------------------------------
    async def _accept_loop(self, sock: socket.socket) -> None:
        assert self.tg is not None
        backoff = 0.0
        while True:
            await anyio.wait_readable(sock)
            for _ in range(_ACCEPT_BATCH):
                try:
                    client, peer = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _RESOURCE_ERRNOS:
                        if not backoff:
                            logger.error(
                                "route %s: accept failed on %s: %s; backing off",
                                self.live.spec.alias,
                                self.live.spec.key,
                                exc,
                            )
                        backoff = min(max(backoff * 2, _BACKOFF_MIN), _BACKOFF_MAX)
                        await anyio.sleep(backoff)
                        break
                    logger.debug("route %s: accept: %s", self.live.spec.alias, exc)
                    continue
                backoff = 0.0
                self.setups += 1
                self.tg.start_soon(self._setup, client, peer)

    # -- one connection --------------------------------------------------------------------
    async def _setup(self, client: socket.socket, peer_addr: tuple[str, int]) -> None:
        live = self.live
        spec = live.spec
        upstream: socket.socket | None = None
        conn: ConnInfo | None = None
        handed_off = False
        try:
            client.setblocking(False)
            set_nodelay(client)
            peer, listen = self._addresses(client, peer_addr)
            source, dest, rest, sniff = peer, listen, b"", False
            mode = live.edge.accept_proxy_protocol
            if mode != "off":
                trusted = live.trusted_proxies is not None and live.trusted_proxies.permits(peer[0])
                if trusted:
                    try:
                        header = await read_client_header(
                            client, mode=mode, timeout=live.edge.proxy_header_timeout
                        )
                    except HeaderRefusedError as exc:
                        live.counters.reject("proxy_header")
                        logger.info("route %s: refused client %s: %s", spec.alias, peer[0], exc)
                        return
                    source = header.source or peer
                    dest = header.dest or listen
                    rest = header.rest
                else:
                    sniff = True
            conn = ConnInfo(
                route=spec.alias, transport="tcp", client=source, peer=peer, listen=dest
            )
            reason = live.admit(conn)
            if reason is not None:
                logger.debug("route %s: refused client %s (%s)", spec.alias, source[0], reason)
                conn = None
                return
            upstream = await self._dial(conn)
            if upstream is None:
                return
            version = live.spec.options.proxy_protocol
            if version is not None:
                rest = build_header(version, source, dest) + rest
            relay = self._relay(client, upstream, conn, prefix=rest, sniff=sniff)
            self.relays.add(relay)
            handed_off = True
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("route %s: %s -> %s open", spec.alias, source[0], conn.backend)
            relay.start()
        except Exception:
            logger.exception("route %s: connection setup failed", spec.alias)
        finally:
            self.setups -= 1
            if not handed_off:
                client.close()
                if upstream is not None:
                    upstream.close()
                if conn is not None:
                    self._release(conn)
            self._settled()

    def _addresses(
        self, client: socket.socket, peer_addr: tuple[str, int]
    ) -> tuple[tuple[str, int], tuple[str, int]]:
        """(client, listener) addresses, IPv4-mapped ones unwrapped; the listener tuple is
        shared between connections that hit the same address (idle connections stay small)."""
        if client.family == socket.AF_INET6:
            peer = (unmap(peer_addr[0]), int(peer_addr[1]))
            name = bound_address(client)
            listen = (unmap(name[0]), name[1])
        else:
            peer = (peer_addr[0], peer_addr[1])
            listen = bound_address(client)
        if listen == self._last_listen:
            listen = self._last_listen
        else:
            self._last_listen = listen
        return peer, listen

    def _relay(
        self,
        client: socket.socket,
        upstream: socket.socket,
        conn: ConnInfo,
        *,
        prefix: bytes,
        sniff: bool,
    ) -> Relay:
        idle = self.live.idle_timeout
        if self.pool is not None:
            return SpliceRelay(
                client,
                upstream,
                conn=conn,
                hooks=self.hooks,
                on_done=self._relay_done,
                prefix=prefix,
                idle_timeout=idle,
                sniff=sniff,
                pool=self.pool,
            )
        return Relay(
            client,
            upstream,
            conn=conn,
            hooks=self.hooks,
            on_done=self._relay_done,
            prefix=prefix,
            idle_timeout=idle,
            sniff=sniff,
        )

    async def _dial(self, conn: ConnInfo) -> socket.socket | None:
        """Connect to the picked backend, then to the others in turn; None if all fail."""
        live = self.live
        first = live.pick_backend(conn.client[0])
        if first is None:
            live.counters.reject("no_backend")
            conn.close_reason = "no_backend"
            return None
        backends = live.spec.backends
        order = [first] + [b for b in backends if b != first]
        for backend in order:
            conn.backend = backend
            live.backend_opened(backend)
            started = time.monotonic()
            try:
                sock = await dial(backend, timeout=live.connect_timeout)
            except (OSError, TimeoutError) as exc:
                live.backend_closed(backend)
                conn.backend = None
                live.counters.dial_errors += 1
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timeout"
                logger.error("route %s: dial %s failed: %s", conn.route, backend, why)
                continue
            live.counters.observe_dial(time.monotonic() - started)
            return sock
        conn.close_reason = "dial_error"
        return None

    def _relay_done(self, relay: Relay) -> None:
        self.relays.discard(relay)
        conn = relay.conn
        if conn.close_reason == "proxy_header":
            self.live.counters.reject("proxy_header")
        self._release(conn)
        self._settled()

    def _release(self, conn: ConnInfo) -> None:
        self.live.release(conn)
        if access_log.isEnabledFor(logging.INFO):
            duration = time.monotonic() - conn.started
            backend = str(conn.backend) if conn.backend is not None else ""
            access_log.info(
                "%s %s:%d -> %s in=%d out=%d %.3fs %s",
                conn.route,
                conn.client[0],
                conn.client[1],
                backend or "-",
                conn.bytes_in,
                conn.bytes_out,
                duration,
                conn.close_reason or "closed",
                extra={
                    "client": f"{conn.client[0]}:{conn.client[1]}",
                    "route": conn.route,
                    "backend": backend,
                    "bytes_in": conn.bytes_in,
                    "bytes_out": conn.bytes_out,
                    "duration": round(duration, 6),
                    "reason": conn.close_reason or "closed",
                },
            )
