"""A UDP session's state and its logs: `UdpSession`, the access-log record, hook selection.

`UdpSession` is what the relay keeps per client address (its upstream socket, the PROXY
header built once for it, the last activity time). The access log is one INFO record on
logger `labelproxy.access` per ended session, with structured context (`extra`) for the JSON
log format; session opens are logged at DEBUG.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import time

from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.udp.sockets import SockAddr

logger = logging.getLogger(__name__)
access_log = logging.getLogger("labelproxy.access")


class UdpSession:
    """One client address, its upstream socket and its accounting."""

    __slots__ = ("addr", "closed", "conn", "header", "last_active", "pending", "raw", "sock")

    def __init__(self, addr: SockAddr, conn: ConnInfo, header: bytes | None) -> None:
        self.addr = addr
        self.conn = conn
        self.header = header
        self.sock: socket.socket | None = None
        self.pending: list[bytes] | None = None  # datagrams waiting for name resolution
        self.last_active = time.monotonic()
        self.closed = False
        #: batched path only (udp_batched): the raw sockaddr and pinned C copies of it and
        #: of the header, as (address, length) pairs for sendmmsg
        self.raw: RawRefs | None = None


class RawRefs:
    """What the batched path keeps per session: the client's raw sockaddr (its key) and C
    buffers holding it and the PROXY header, which must stay alive while the session does."""

    __slots__ = ("header", "keep", "key", "name")

    def __init__(self, key: bytes, header: bytes | None) -> None:
        self.key = key
        name_buf = ctypes.create_string_buffer(key, len(key))
        self.name = (ctypes.addressof(name_buf), len(key))
        self.header: tuple[int, int] | None = None
        keep: list[ctypes.Array[ctypes.c_char]] = [name_buf]
        if header is not None:
            header_buf = ctypes.create_string_buffer(header, len(header))
            self.header = (ctypes.addressof(header_buf), len(header))
            keep.append(header_buf)
        self.keep = keep


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def log_session_opened(conn: ConnInfo, *, listen: str) -> None:
    logger.debug(
        "udp session open %s:%d -> %s on %s",
        conn.client[0],
        conn.client[1],
        conn.backend,
        listen,
        extra={
            "route": conn.route,
            "protocol": "udp",
            "listen": listen,
            "dst": str(conn.backend),
            "action": "open",
        },
    )


def log_session_closed(conn: ConnInfo, *, listen: str, reason: str) -> None:
    """The access-log record of an ended session."""
    duration = time.monotonic() - conn.started
    access_log.info(
        "udp session closed",
        extra={
            "route": conn.route,
            "protocol": "udp",
            "listen": listen,
            "dst": str(conn.backend),
            "action": "close",
            "client": f"{conn.client[0]}:{conn.client[1]}",
            "backend": str(conn.backend),
            "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out,
            "duration": round(duration, 6),
            "reason": reason,
        },
    )
