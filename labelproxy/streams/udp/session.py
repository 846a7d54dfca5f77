"""A UDP session's state: what the relay keeps per client address.

`UdpSession` holds its upstream socket, the PROXY header built once for it, the last
activity time, the datagrams waiting for its backend's name to resolve, and for the batched
path (`batched`) C copies of its address and header (`RawRefs`). Sessions live on the
asyncio loop, like their relay (`relay.UdpRelay`).
"""

from __future__ import annotations

import ctypes
import socket
import time

from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.udp.sockets import SockAddr


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
        #: batched path only (`batched`): the raw sockaddr and pinned C copies of it and
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
