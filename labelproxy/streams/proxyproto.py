"""PROXY protocol v1/v2: framing of headers read from clients, and headers built for upstreams.

Parsing and building are the `proxy-protocol` package's (`proxyprotocol` module); this module
only frames the bytes (how much belongs to the header, what follows it), bounds their size
and turns results into plain (host, port) pairs:

  `HeaderParser.feed(data)` accumulates client bytes and returns a `ParsedHeader` (the carried
  source/destination, or None for LOCAL/UNKNOWN, plus the bytes that followed the header),
  None while more is needed, or raises `HeaderError` (malformed, oversized, checksum).
  `looks_like_header(prefix)` tells whether a client's first bytes are (or may become) a
  PROXY signature, so an untrusted client's header can be refused. Bytes that are only the
  start of a signature for longer than `PEEK_DEADLINE` are not a header.
  `build_header(version, source, dest)` builds the header sent upstream (TCP, v1 or v2);
  `build_dgram_header(source, dest)` the v2 DGRAM header UDP puts on each datagram;
  `parse_dgram(data)` reads one back (for UDP receivers and tests).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from proxyprotocol import ProxyProtocolIncompleteError
from proxyprotocol.result import (
    ProxyResult,
    ProxyResultIPv4,
    ProxyResultIPv6,
    is_ipv4,
    is_ipv6,
)
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from labelproxy.spec import ProxyProtocolVersion
from labelproxy.streams.addresses import IPAddress, ip_of

logger = logging.getLogger(__name__)

SIGNATURE_V1 = b"PROXY "
SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_FIXED = 16
V2_MAX = V2_FIXED + 2048  # addresses + generous TLVs; anything larger is refused
# How long a client's first bytes may stay an unfinished PROXY signature (`PRO`, or nothing
# yet from a trusted client in `optional` mode) before they are taken as no header at all:
# a proxy sends its header in one piece right after connecting, while a client of a
# protocol where the server speaks first (SSH, SMTP) sends nothing until it hears a banner.
PEEK_DEADLINE = 0.2

_V1 = ProxyProtocolV1()
_V2 = ProxyProtocolV2()

Address = tuple[str, int]


class HeaderError(ValueError):
    """A client's PROXY header is malformed, oversized or fails its checksum."""


@dataclass(frozen=True, slots=True)
class ParsedHeader:
    """A complete header: the carried addresses (None for LOCAL/UNKNOWN) and what followed."""

    source: Address | None
    dest: Address | None
    rest: bytes
    version: int


def looks_like_header(prefix: bytes) -> bool | None:
    """True: `prefix` starts with a PROXY signature; False: it cannot; None: too short to say."""
    for sig in (SIGNATURE_V1, SIGNATURE_V2):
        n = min(len(prefix), len(sig))
        if prefix[:n] == sig[:n]:
            return True if len(prefix) >= len(sig) else None
    return False


class HeaderParser:
    """Incremental framing of one client's PROXY header (v1 or v2), bounded in size."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> ParsedHeader | None:
        """Add bytes; the header once complete, None while incomplete; HeaderError if bad."""
        self._buf += data
        buf = self._buf
        kind = looks_like_header(bytes(buf[: len(SIGNATURE_V2)]))
        if kind is False:
            raise HeaderError("no PROXY protocol signature")
        if kind is None:
            return None
        if buf.startswith(SIGNATURE_V1):
            return self._feed_v1(buf)
        return self._feed_v2(buf)

    @staticmethod
    def _feed_v1(buf: bytearray) -> ParsedHeader | None:
        end = buf.find(b"\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise HeaderError(f"PROXY v1 line longer than {V1_MAX} bytes")
            return None
        line = bytes(buf[: end + 1])
        try:
            result = _V1.unpack(line)
        except (ProxyProtocolIncompleteError, ValueError, IndexError) as exc:
            raise HeaderError(f"bad PROXY v1 header: {exc}") from exc
        return _parsed(result, bytes(buf[end + 1 :]), 1)

    @staticmethod
    def _feed_v2(buf: bytearray) -> ParsedHeader | None:
        if len(buf) < V2_FIXED:
            return None
        try:
            fixed = _V2.unpack_header(bytes(buf[:V2_FIXED]))
        except ValueError as exc:
            raise HeaderError(f"bad PROXY v2 header: {exc}") from exc
        total = V2_FIXED + fixed.data_len
        if total > V2_MAX:
            raise HeaderError(f"PROXY v2 header of {total} bytes exceeds {V2_MAX}")
        if len(buf) < total:
            return None
        try:
            result = _V2.unpack(bytes(buf[:total]))
        except (ProxyProtocolIncompleteError, ValueError, IndexError) as exc:
            raise HeaderError(f"bad PROXY v2 header: {exc!r}") from exc
        return _parsed(result, bytes(buf[total:]), 2)


def _parsed(result: ProxyResult, rest: bytes, version: int) -> ParsedHeader:
    if result.proxied and (is_ipv4(result) or is_ipv6(result)):
        src, dst = result.source, result.dest
        return ParsedHeader((str(src[0]), src[1]), (str(dst[0]), dst[1]), rest, version)
    return ParsedHeader(None, None, rest, version)


def _ip(host: str) -> IPAddress:
    ip = ip_of(host)
    if ip is None:
        raise ValueError(f"not an IP address: {host!r}")
    return ip


def _result(source: Address, dest: Address, kind: socket.SocketKind) -> ProxyResult:
    src, dst = _ip(source[0]), _ip(dest[0])
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
        return ProxyResultIPv4((src, source[1]), (dst, dest[1]), protocol=kind)
    # mixed families: carry both as IPv6 (IPv4 as mapped addresses)
    src6 = src if isinstance(src, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{src}")
    dst6 = dst if isinstance(dst, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{dst}")
    return ProxyResultIPv6((src6, source[1]), (dst6, dest[1]), protocol=kind)


def build_header(version: ProxyProtocolVersion, source: Address, dest: Address) -> bytes:
    """The PROXY header (TCP) announcing `source` -> `dest` to an upstream."""
    result = _result(source, dest, socket.SOCK_STREAM)
    return _V1.pack(result) if version == "v1" else _V2.pack(result)


def build_dgram_header(source: Address, dest: Address) -> bytes:
    """The PROXY v2 header (DGRAM command) that prefixes one relayed UDP datagram."""
    return _V2.pack(_result(source, dest, socket.SOCK_DGRAM))


def parse_dgram(data: bytes) -> tuple[Address | None, bytes]:
    """Split a datagram carrying a v2 header into (source address or None, payload)."""
    parser = HeaderParser()
    parsed = parser.feed(data)
    if parsed is None:
        raise HeaderError("truncated PROXY v2 header in datagram")
    return parsed.source, parsed.rest
