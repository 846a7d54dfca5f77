"""The server name (SNI) of a TLS ClientHello, read incrementally from the raw bytes.

`HelloParser.feed(data)` takes the client's bytes as they come (one byte at a time, a
ClientHello split over several TLS records, anything) and returns None while it needs
more, or the server name once the whole ClientHello is in ("" when it carries none). It
raises `PeekError` (a `ValueError`) on anything that is not a well-formed ClientHello:
another record type, a bad length, an alert, a truncated extension, a name that is not
ASCII. It keeps no copy of what it was fed (the caller keeps the bytes to relay them);
it only joins the handshake fragments, bounded by `limit`.

Written from RFC 8446 (sections 4.1.2, 5.1) and RFC 6066 (section 3); TLS 1.0 to 1.3
ClientHellos share this layout (SSLv2-compatible hellos are refused).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
NAME_TYPE_HOST = 0
MAX_RECORD = 1 << 14  # a TLSPlaintext fragment (RFC 8446 5.1)
_HEADER = 5


class PeekError(ValueError):
    """The client's first bytes are not what a named listener can route: why, in words."""


class HelloParser:
    """Incremental ClientHello reader; see the module docstring."""

    __slots__ = ("_handshake", "_limit", "_pending")

    def __init__(self, *, limit: int) -> None:
        self._limit = limit
        self._pending = bytearray()  # bytes of the record not complete yet
        self._handshake = bytearray()  # the handshake fragments joined

    def feed(self, data: bytes) -> str | None:
        """The server name once the ClientHello is complete ("" for none); None: more."""
        pending = self._pending
        pending += data
        while len(pending) >= _HEADER:
            kind, major, length = pending[0], pending[1], (pending[3] << 8) | pending[4]
            if kind != RECORD_HANDSHAKE:
                raise PeekError(f"TLS record type {kind}, expected a handshake (22)")
            if major != 3:
                raise PeekError(f"TLS record version {major}.{pending[2]}")
            if not 0 < length <= MAX_RECORD:
                raise PeekError(f"TLS record of {length} bytes")
            if len(pending) < _HEADER + length:
                return None
            self._handshake += pending[_HEADER : _HEADER + length]
            del pending[: _HEADER + length]
            name = self._complete()
            if name is not None:
                return name
        return None

    def _complete(self) -> str | None:
        """The name when the joined fragments hold a whole ClientHello, else None."""
        hs = self._handshake
        if len(hs) < 4:
            return None
        if hs[0] != HANDSHAKE_CLIENT_HELLO:
            raise PeekError(f"TLS handshake message {hs[0]}, expected a ClientHello (1)")
        length = int.from_bytes(hs[1:4], "big")
        if length > self._limit:
            raise PeekError(f"ClientHello of {length} bytes, over the {self._limit} read")
        if len(hs) < 4 + length:
            return None
        return server_name(bytes(hs[4 : 4 + length]))


class _Cursor:
    """Reads big-endian fields from a ClientHello body; PeekError past its end."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise PeekError(f"ClientHello truncated in its {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def number(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, n: int, what: str) -> _Cursor:
        """The cursor of a vector whose length takes `n` bytes; this one moves past it."""
        length = self.number(n, what)
        start = self.pos
        self.take(length, what)
        return _Cursor(self.data, start, start + length)

    def take_all(self) -> bytes:
        return self.take(self.left, "vector")

    @property
    def left(self) -> int:
        return self.end - self.pos


def server_name(body: bytes) -> str:
    """The host name of the server_name extension of a ClientHello body ("" if none)."""
    c = _Cursor(body)
    c.take(2 + 32, "version and random")
    c.vector(1, "session id")
    suites = c.vector(2, "cipher suites")
    if suites.left == 0 or suites.left % 2:
        raise PeekError("ClientHello with a malformed cipher suite list")
    c.vector(1, "compression methods")
    if c.left == 0:
        return ""  # no extensions (TLS 1.0 clients may omit them)
    extensions = c.vector(2, "extensions")
    if c.left:
        raise PeekError("ClientHello with bytes after its extensions")
    name = ""
    while extensions.left:
        kind = extensions.number(2, "extension type")
        data = extensions.vector(2, "extension")
        if kind == EXTENSION_SERVER_NAME:
            name = _host_name(data)
    return name


def _host_name(ext: _Cursor) -> str:
    names = ext.vector(2, "server name list")
    found = ""
    while names.left:
        kind = names.number(1, "server name type")
        value = names.vector(2, "server name").take_all()
        if kind == NAME_TYPE_HOST and not found:
            try:
                found = value.decode("ascii")
            except UnicodeDecodeError:
                raise PeekError("server name that is not ASCII") from None
            if not found:
                raise PeekError("empty server name")
    return found
