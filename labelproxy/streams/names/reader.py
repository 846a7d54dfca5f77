"""From a client's first bytes to the name it asks for: TLS or Minecraft, whichever it is.

`NameReader(limit=..., proxy_header=...)` is fed the client's bytes as they arrive.
For a trusted proxy's client (`proxy_header`: `LABELPROXY_ACCEPT_PROXY_PROTOCOL`) a PROXY
v1/v2 header is read first and its addresses kept: `required`, it must be one
(`HeaderRefusedError`); `optional`, first bytes that cannot start one are the hello.
The protocol is told from the first two bytes: `16 03` is a TLS handshake record
(`hello`), anything else is taken for a Minecraft handshake (`minecraft`; its length
VarInt is followed by packet id 0, never 3). `feed` returns None while it needs more and
a `Peeked` once the name is known; it raises `PeekError` for bytes that name nothing
(garbage, an oversized or malformed hello) or when `limit` bytes came without a hello.
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

from labelproxy.spec import AcceptProxyProtocol
from labelproxy.streams.names.hello import RECORD_HANDSHAKE, HelloParser, PeekError
from labelproxy.streams.names.minecraft import MinecraftParser
from labelproxy.streams.proxyproto import HeaderError, HeaderParser, looks_like_header

logger = logging.getLogger(__name__)

PEEK_LIMIT = 16 * 1024
Protocol = Literal["tls", "minecraft"]


class HeaderRefusedError(Exception):
    """A trusted proxy's client did not start with a valid PROXY header."""


class Peeked(NamedTuple):  # a tuple: made once per connection, cheaper than a dataclass
    """What the first bytes said: the protocol, the name ("" when none was sent), the bytes
    read after any PROXY header (to relay unchanged) and that header's addresses."""

    protocol: Protocol
    name: str
    data: bytes
    source: tuple[str, int] | None = None
    dest: tuple[str, int] | None = None


class NameReader:
    """Incremental reader of one client's name; see the module docstring."""

    __slots__ = (
        "_data", "_header", "_limit", "_optional", "_parser", "_protocol", "_source_dest",
        "_undecided",
    )  # fmt: skip

    def __init__(
        self, *, limit: int = PEEK_LIMIT, proxy_header: AcceptProxyProtocol = "off"
    ) -> None:
        self._limit = limit
        self._header = HeaderParser() if proxy_header != "off" else None
        self._optional = proxy_header == "optional"
        self._undecided = b""  # `optional`: the first bytes, until they say header or not
        self._source_dest: tuple[tuple[str, int] | None, tuple[str, int] | None] = (None, None)
        self._data = bytearray()  # after the PROXY header
        self._parser: HelloParser | MinecraftParser | None = None
        self._protocol: Protocol = "tls"

    def feed(self, data: bytes) -> Peeked | None:
        if self._header is not None and self._optional:
            seen = self._undecided = self._undecided + data
            says = looks_like_header(seen[:16])
            if says is None:
                return None
            if says is False:  # `optional` and no PROXY signature: the bytes are the hello
                self._header = None
                data = seen
        if self._header is not None:
            try:
                parsed = self._header.feed(data)
            except HeaderError as exc:
                raise HeaderRefusedError(str(exc)) from exc
            if parsed is None:
                return None
            self._header = None
            self._source_dest = (parsed.source, parsed.dest)
            data = parsed.rest
            if not data:
                return None
        self._data += data
        parser = self._parser
        if parser is None:
            if len(self._data) < 2:
                return None
            if self._data[0] == RECORD_HANDSHAKE and self._data[1] == 3:
                parser = HelloParser(limit=self._limit)
            else:
                parser = MinecraftParser()
                self._protocol = "minecraft"
            self._parser = parser
            data = bytes(self._data)
        name = parser.feed(data)
        if name is None:
            if len(self._data) >= self._limit:
                raise PeekError(f"no whole ClientHello or handshake in {self._limit} bytes")
            return None
        source, dest = self._source_dest
        return Peeked(self._protocol, name, bytes(self._data), source, dest)

    @property
    def read(self) -> int:
        """Bytes read after the PROXY header so far."""
        return len(self._data)
