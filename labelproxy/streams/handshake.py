"""The waiting steps of a TCP connection's setup: the client's PROXY header, host names.

`read_client_header` waits (within a deadline) for a trusted client's PROXY header and
returns what it carries plus the bytes that followed it; it raises, never hangs, and the
caller closes the client and counts the reason. `resolve` gives the address to dial a
backend at (its IP literal, or its host name's first address).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass

import anyio

from labelproxy.spec import AcceptProxyProtocol, Backend
from labelproxy.streams.proxyproto import HeaderError, HeaderParser, looks_like_header

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
    client: socket.socket, *, mode: AcceptProxyProtocol, timeout: float
) -> ClientHeader:
    """Read a PROXY header from a trusted client. `optional`: a client whose first bytes are
    not a PROXY signature, or who sends nothing before the deadline, is served as is."""
    parser = HeaderParser()
    seen = bytearray()  # everything read, in case it is not a header after all
    try:
        with anyio.fail_after(timeout):
            while True:
                await anyio.wait_readable(client)
                try:
                    data = client.recv(_READ)
                except BlockingIOError:
                    continue
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
        if not seen and mode == "optional":
            return ClientHeader(None, None, b"")
        raise HeaderRefusedError(f"no complete PROXY header within {timeout:g}s") from None
    except HeaderError as exc:
        raise HeaderRefusedError(str(exc)) from exc


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
