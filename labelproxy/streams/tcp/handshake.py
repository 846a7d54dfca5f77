"""The waiting steps of a TCP connection's setup: the client's PROXY header, host names.

`read_client_header` waits (within a deadline) for a trusted client's PROXY header and
returns what it carries plus the bytes that followed it; it raises, never hangs, and the
caller closes the client and counts the reason. In `optional` mode a client that has not
sent a whole PROXY signature within `PEEK_DEADLINE` (200 ms) has none, so a client that
waits for the server to speak first is not held for the whole header timeout. `resolve`
gives the address to dial a backend at (its IP literal, or its host name's first address).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass

import anyio

from labelproxy.spec import AcceptProxyProtocol, Backend
from labelproxy.streams.proxyproto import (
    PEEK_DEADLINE,
    HeaderError,
    HeaderParser,
    looks_like_header,
)

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


def _family(host: str) -> socket.AddressFamily | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


async def resolve(backend: Backend) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """(family, sockaddr) to dial `backend` at: its IP literal, or its name's first
    address; OSError when the name does not resolve."""
    family = _family(backend.host)
    if family is not None:
        return family, (backend.host, backend.port)
    infos = await anyio.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"{backend.host} does not resolve")
    fam, _, _, _, addr = infos[0]
    return socket.AddressFamily(fam), (str(addr[0]), int(addr[1]))
