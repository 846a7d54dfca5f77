"""The waiting part of a TCP connection's setup, as a short task on the asyncio loop.

Most connections are set up in data-loop callbacks (`server.TcpServer`). When a client must
be waited for, the listener hands it to `set_up` instead: a trusted proxy's PROXY header is
read first (`read_client_header`), and backends that are host names are resolved
(`resolve_all`). It returns what it found (`Found`: the client's addresses, the bytes read
after its header, each backend's address) or raises `HeaderRefusedError`; it touches no
counter and no connection state: the listener hands the client back to the data loop,
which admits and dials it like any other.

`read_client_header` waits (within a deadline) for a trusted client's PROXY header and
returns what it carries plus the bytes that followed it; it raises, never hangs, and the
caller closes the client and counts the reason. In `optional` mode a client that has not
sent a whole PROXY signature within `PEEK_DEADLINE` (200 ms) has none, so a client that
waits for the server to speak first is not held for the whole header timeout. `resolve`
gives the address to dial a backend at (its IP literal, or its host name's first address).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from dataclasses import dataclass

import anyio

from labelproxy.spec import AcceptProxyProtocol, Backend
from labelproxy.streams.addresses import literal_family
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.proxyproto import (
    PEEK_DEADLINE,
    HeaderError,
    HeaderParser,
    looks_like_header,
)
from labelproxy.streams.tcp.dial import Address

logger = logging.getLogger(__name__)

_READ = 4096


class HeaderRefusedError(Exception):
    """The client's PROXY header is missing, malformed, oversized or too slow."""


@dataclass(frozen=True, slots=True)
class ClientHeader:
    """What a trusted client's first bytes said: the carried addresses (None: not proxied,
    use the socket's) and the payload bytes already read after the header."""

    source: tuple[str, int] | None
    dest: tuple[str, int] | None
    rest: bytes


@dataclass(frozen=True, slots=True)
class Found:
    """What the setup of one client found: its addresses (from its PROXY header, else its
    socket's), the bytes read after the header, each backend's address (None: no address)."""

    source: tuple[str, int]
    dest: tuple[str, int]
    rest: bytes
    addrs: dict[Backend, Address | None]


async def set_up(
    live: LiveRoute,
    client: socket.socket,
    peer: tuple[str, int],
    listen: tuple[str, int],
    *,
    read_header: bool,
) -> Found:
    """Read the client's PROXY header (`read_header`: a trusted proxy's) and resolve the
    route's backends. Raises HeaderRefusedError."""
    source, dest, rest = peer, listen, b""
    if read_header:
        header = await read_client_header(
            client,
            mode=live.edge.accept_proxy_protocol,
            timeout=live.edge.proxy_header_timeout,
        )
        source = header.source or peer
        dest = header.dest or listen
        rest = header.rest
    return Found(source, dest, rest, await resolve_all(live))


async def resolve_all(live: LiveRoute) -> dict[Backend, Address | None]:
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


async def resolve(backend: Backend) -> Address:
    """(family, sockaddr) to dial `backend` at: its IP literal, or its name's first
    address; OSError when the name does not resolve."""
    family = literal_family(backend.host)
    if family is not None:
        return family, (backend.host, backend.port)
    infos = await anyio.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"{backend.host} does not resolve")
    fam, _, _, _, addr = infos[0]
    return socket.AddressFamily(fam), (str(addr[0]), int(addr[1]))


async def read_client_header(
    client: socket.socket,
    *,
    mode: AcceptProxyProtocol,
    timeout: float,
    peek: float = PEEK_DEADLINE,
) -> ClientHeader:
    """Read a PROXY header from a trusted client within `timeout`.

    `optional`: a client whose first bytes are not a PROXY signature, or who has not sent a
    whole signature within `peek` seconds (nothing yet: a protocol where the server speaks
    first; or a pause after `PRO`), or who closes before one, is served as is: the bytes read
    are relayed unchanged. Once a signature is complete the rest of the header must come
    within `timeout`. `required`: the whole header must come within `timeout`."""
    parser = HeaderParser()
    seen = bytearray()  # everything read, in case it is not a header after all
    peek_until = anyio.current_time() + min(peek, timeout)
    try:
        with anyio.fail_after(timeout):
            while True:
                undecided = mode == "optional" and looks_like_header(bytes(seen[:16])) is None
                data = await _receive(client, until=peek_until if undecided else None)
                if data is None or (not data and undecided):
                    return ClientHeader(None, None, bytes(seen))  # no header after all
                if not data:
                    raise HeaderRefusedError("client closed before its PROXY header ended")
                first = len(seen) < 16
                seen += data
                if first and looks_like_header(bytes(seen[:16])) is False:
                    if mode == "required":
                        raise HeaderRefusedError("no PROXY header from a trusted proxy")
                    return ClientHeader(None, None, bytes(seen))
                parsed = parser.feed(data)
                if parsed is not None:
                    return ClientHeader(parsed.source, parsed.dest, parsed.rest)
    except TimeoutError:
        raise HeaderRefusedError(f"no complete PROXY header within {timeout:g}s") from None
    except HeaderError as exc:
        raise HeaderRefusedError(str(exc)) from exc


async def _receive(client: socket.socket, *, until: float | None) -> bytes | None:
    """The next bytes from `client` (b"" at its EOF); None when `until` (an anyio clock
    time) passed first. What is already queued is read even past `until`."""
    while True:
        try:
            return client.recv(_READ)
        except BlockingIOError:
            pass
        if until is None:
            await anyio.wait_readable(client)
            continue
        left = until - anyio.current_time()
        if left <= 0:
            return None
        with anyio.move_on_after(left):
            await anyio.wait_readable(client)
