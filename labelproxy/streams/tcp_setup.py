"""The task path of a TCP connection's setup, and the access log.

Most connections are set up in loop callbacks (`tcp._TcpServer._admit`). A short anyio task
(`setup_task`) is used where a coroutine is simpler: a trusted client's PROXY header has to
be read first, or a backend is a hostname that needs resolving. It runs the same steps (hooks
via `live.admit`, backend pick, dial with failover and the same accounting) and hands both
sockets to the server's relay. `log_access` writes the one access record of a closed
connection on `labelproxy.access` (INFO), skipped cheaply when that level is off.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Protocol

import anyio.abc

from labelproxy.streams.handshake import HeaderRefusedError, dial, read_client_header
from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.proxyproto import build_header
from labelproxy.streams.route import LiveRoute

logger = logging.getLogger("labelproxy.streams.tcp")
access_log = logging.getLogger("labelproxy.access")


class Server(Protocol):
    live: LiveRoute
    setups: int
    tg: anyio.abc.TaskGroup | None

    def settled(self) -> None: ...

    def release(self, conn: ConnInfo) -> None: ...

    def start_relay(
        self,
        client: socket.socket,
        upstream: socket.socket,
        conn: ConnInfo,
        *,
        prefix: bytes,
        sniff: bool,
    ) -> None: ...


async def setup_task(
    server: Server, client: socket.socket, peer: tuple[str, int], listen: tuple[str, int]
) -> None:
    """Set up one connection (already non-blocking); the server counted it in `setups`."""
    live = server.live
    spec = live.spec
    upstream: socket.socket | None = None
    conn: ConnInfo | None = None
    handed_off = False
    try:
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
        conn = ConnInfo(route=spec.alias, transport="tcp", client=source, peer=peer, listen=dest)
        reason = live.admit(conn)
        if reason is not None:
            logger.debug("route %s: refused client %s (%s)", spec.alias, source[0], reason)
            conn = None
            return
        upstream = await _dial(live, conn)
        if upstream is None:
            return
        version = live.spec.options.proxy_protocol
        if version is not None:
            rest = build_header(version, source, dest) + rest
        handed_off = True
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("route %s: %s -> %s open", spec.alias, source[0], conn.backend)
        server.start_relay(client, upstream, conn, prefix=rest, sniff=sniff)
    except Exception:
        logger.exception("route %s: connection setup failed", spec.alias)
    finally:
        server.setups -= 1
        if not handed_off:
            client.close()
            if upstream is not None:
                upstream.close()
            if conn is not None:
                server.release(conn)
        server.settled()


async def _dial(live: LiveRoute, conn: ConnInfo) -> socket.socket | None:
    """Connect to the picked backend, then to the others in turn; None if all fail."""
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


def log_access(conn: ConnInfo) -> None:
    """One INFO record on `labelproxy.access` for a closed connection."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    duration = time.monotonic() - conn.started
    backend = str(conn.backend) if conn.backend is not None else ""
    reason = conn.close_reason or "closed"
    access_log.info(
        "tcp connection closed",
        extra={
            "client": f"{conn.client[0]}:{conn.client[1]}",
            "route": conn.route,
            "protocol": "tcp",
            "backend": backend,
            "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out,
            "duration": round(duration, 6),
            "reason": reason,
        },
    )
