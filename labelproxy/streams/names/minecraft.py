"""The server address of a Minecraft Java Edition handshake, read incrementally.

A Java client opens with a handshake packet, `VarInt length, VarInt id 0x00, VarInt
protocol version, String server address, u16 port, VarInt next state` (1 status, 2 login,
3 transfer), where a String is a VarInt byte count and UTF-8. The address is what the
player typed; Forge clients append `\\0FML\\0` (or `\\0FML2\\0`, `\\0FML3\\0`) and some proxies
more `\\0`-separated data: everything from the first NUL is dropped. A trailing dot (an SRV
answer) is the table's to ignore. The pre-1.7 status ping (0xFE) is not a handshake.

`MinecraftParser.feed(data)` returns None while it needs more, the address once the whole
packet is in, and raises `PeekError` on anything else.
"""

from __future__ import annotations

import logging

from labelproxy.health.protocols import read_varint
from labelproxy.streams.names.hello import PeekError

logger = logging.getLogger(__name__)

HANDSHAKE_ID = 0
MAX_ADDRESS = 255 * 4  # the protocol caps the string at 255 characters
MAX_PACKET = MAX_ADDRESS + 32
NEXT_STATES = frozenset({1, 2, 3})


def _varint(buf: bytes | bytearray, pos: int, what: str) -> tuple[int, int] | None:
    """(value, position after it) of a VarInt (at most 5 bytes, as the health probe reads
    them: signed 32 bits), None when cut short."""
    try:
        return read_varint(buf, pos)
    except ValueError:
        raise PeekError(f"Minecraft handshake with an overlong VarInt ({what})") from None


def _need(found: tuple[int, int] | None, what: str) -> tuple[int, int]:
    if found is None:  # inside a complete packet: it is cut short
        raise PeekError(f"Minecraft handshake truncated in its {what}")
    return found


class MinecraftParser:
    """Incremental handshake reader; see the module docstring."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> str | None:
        buf = self._buf
        buf += data
        head = _varint(buf, 0, "packet length")
        if head is None:
            return None
        length, start = head
        if not 0 < length <= MAX_PACKET:
            raise PeekError(f"Minecraft packet of {length} bytes is not a handshake")
        if len(buf) < start + length:
            if len(buf) > start and buf[start] != HANDSHAKE_ID:
                raise PeekError(f"Minecraft packet id {buf[start]}, expected a handshake (0)")
            return None
        return address(bytes(buf[start : start + length]))


def address(packet: bytes) -> str:
    """The server address of a whole handshake packet (its length prefix removed)."""
    packet_id, pos = _need(_varint(packet, 0, "packet id"), "packet id")
    if packet_id != HANDSHAKE_ID:
        raise PeekError(f"Minecraft packet id {packet_id}, expected a handshake (0)")
    _, pos = _need(_varint(packet, pos, "protocol version"), "protocol version")
    size, pos = _need(_varint(packet, pos, "address length"), "address length")
    if not 0 <= size <= MAX_ADDRESS or pos + size + 2 > len(packet):
        raise PeekError("Minecraft handshake with a bad server address length")
    raw = packet[pos : pos + size]
    state, end = _need(_varint(packet, pos + size + 2, "next state"), "next state")
    if state not in NEXT_STATES or end != len(packet):
        raise PeekError(f"Minecraft handshake with next state {state}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PeekError("Minecraft server address that is not UTF-8") from None
    return text.split("\0", 1)[0]
