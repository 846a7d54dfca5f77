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
import struct

logger = logging.getLogger(__name__)

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
NAME_TYPE_HOST = 0
MAX_RECORD = 1 << 14  # a TLSPlaintext fragment (RFC 8446 5.1)
_HEADER = 5
_EXTENSION = struct.Struct(">HH")  # extension type, length


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


def _u16(data: bytes, pos: int) -> int:
    return (data[pos] << 8) | data[pos + 1]


def _check(pos: int, end: int, what: str) -> None:
    if pos > end:
        raise PeekError(f"ClientHello truncated in its {what}")


def server_name(body: bytes) -> str:
    """The host name of the server_name extension of a ClientHello body ("" if none).
    Plain index arithmetic: this runs once per connection of a shared listener."""
    end = len(body)
    pos = 2 + 32  # legacy_version, random
    _check(pos + 1, end, "version and random")
    pos += 1 + body[pos]  # legacy_session_id
    _check(pos + 2, end, "session id")
    suites = _u16(body, pos)
    if suites == 0 or suites % 2:
        raise PeekError("ClientHello with a malformed cipher suite list")
    pos += 2 + suites
    _check(pos + 1, end, "cipher suites")
    pos += 1 + body[pos]  # legacy_compression_methods
    _check(pos, end, "compression methods")
    if pos == end:
        return ""  # no extensions (TLS 1.0 clients may omit them)
    _check(pos + 2, end, "extensions")
    stop = pos + 2 + _u16(body, pos)
    if stop != end:
        raise PeekError("ClientHello whose extensions do not end with it")
    pos += 2
    name = ""
    header = _EXTENSION.unpack_from
    while pos < stop:  # the hot loop of the peek: a dozen extensions or more
        if pos + 4 > stop:
            raise PeekError("ClientHello truncated in an extension header")
        kind, length = header(body, pos)
        pos += 4 + length
        if pos > stop:
            raise PeekError("ClientHello truncated in an extension")
        if kind == EXTENSION_SERVER_NAME:
            name = _host_name(body, pos - length, pos)
    return name


def _host_name(data: bytes, pos: int, end: int) -> str:
    """The first host_name of a server_name extension's list (RFC 6066 3)."""
    _check(pos + 2, end, "server name list")
    stop = pos + 2 + _u16(data, pos)
    _check(stop, end, "server name list")
    pos += 2
    found = ""
    while pos < stop:
        _check(pos + 3, stop, "server name")
        kind, length = data[pos], _u16(data, pos + 1)
        pos += 3
        _check(pos + length, stop, "server name")
        if kind == NAME_TYPE_HOST and not found:
            try:
                found = data[pos : pos + length].decode("ascii")
            except UnicodeDecodeError:
                raise PeekError("server name that is not ASCII") from None
            if not found:
                raise PeekError("empty server name")
        pos += length
    return found
