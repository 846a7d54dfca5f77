"""The task path of a TCP connection's setup, and the access log.

Most connections are set up in data-loop callbacks (`tcp._TcpServer._admit`). A short anyio
task on the asyncio loop (`setup_task`) does the parts that wait: a trusted client's PROXY
header is read first, or backends that are host names are resolved. It touches no counter
and no connection state: it hands the client fd, its addresses and the resolved backend
addresses back to the data loop (`Server.open`), which admits and dials it like any other
connection. `log_access` writes the one access record of a closed connection on
`labelproxy.access` (INFO), skipped cheaply when that level is off.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import anyio.abc

from labelproxy.spec import Backend
from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.tcp.dial import Address
from labelproxy.streams.tcp.handshake import HeaderRefusedError, read_client_header, resolve

logger = logging.getLogger("labelproxy.streams.tcp.server")
access_log = logging.getLogger("labelproxy.access")


class DataLoop(Protocol):
    def submit(self, fn: Callable[..., object], *args: Any) -> None: ...


class Server(Protocol):
    live: LiveRoute
    setups: int

    @property
    def loop(self) -> DataLoop: ...

    def settled(self) -> None: ...

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
    ) -> None: ...


async def setup_task(
    server: Server, client: socket.socket, peer: tuple[str, int], listen: tuple[str, int]
) -> None:
    """Read a trusted client's PROXY header and resolve host-name backends, then hand the
    client to the data loop; the server counted this task in `setups`."""
    live = server.live
    spec = live.spec
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
                    server.loop.submit(live.counters.reject, "proxy_header")
                    logger.info("route %s: refused client %s: %s", spec.alias, peer[0], exc)
                    return
                source = header.source or peer
                dest = header.dest or listen
                rest = header.rest
            else:
                sniff = True
        addrs = await _resolve_all(live)
        opener = functools.partial(server.open, rest=rest, sniff=sniff, addrs=addrs)
        server.loop.submit(opener, client.detach(), source, peer, dest)
        handed_off = True
    except Exception:
        logger.exception("route %s: connection setup failed", spec.alias)
    finally:
        server.setups -= 1
        if not handed_off:
            client.close()
        server.settled()


async def _resolve_all(live: LiveRoute) -> dict[Backend, Address | None]:
    """Each backend's address; None for a name that does not resolve (logged: the dial
    counts it as failed)."""
    addrs: dict[Backend, Address | None] = {}
    for backend in live.spec.backends:
        started = time.monotonic()
        try:
            with anyio.fail_after(live.connect_timeout):
                addrs[backend] = await resolve(backend)
        except (OSError, TimeoutError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timeout"
            logger.warning(
                "route %s: cannot resolve %s (%.1fs): %s",
                live.spec.alias,
                backend.host,
                time.monotonic() - started,
                why,
            )
            addrs[backend] = None
    return addrs


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
