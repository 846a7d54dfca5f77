"""Batched UDP system calls for the relay: Linux `recvmmsg(2)` / `sendmmsg(2)` through ctypes.

One `MmsgArena` per event-loop thread holds everything the calls need, allocated once: `SLOTS`
receive slots of 64 KiB each in one anonymous mmap (pages are only committed where the kernel
writes, so small datagrams cost little memory), their `mmsghdr`/`iovec` arrays and source
address buffers, and three send vectors whose entry `i` always points at receive slot `i`:

- `up`: one iovec per message (payload only), for a session's connected upstream socket;
- `up_proxied`: two iovecs (the session's PROXY v2 header, then the payload);
- `reply`: payload plus a destination address (`msg_name`), for the listening socket.

So forwarding a run of received slots `[start, start+count)` only writes the payload lengths
(and header pointers or destination addresses) into the prepared vectors, through strided
memoryviews, then makes one `sendmmsg` call. Calls return a count, or `-errno`; they never
raise. The arena is only used inside synchronous loop callbacks, which finish with it before
returning, so relays of one thread can share it. `available()` is False off Linux or when
libc lacks the calls; the relay then uses its per-datagram path.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import socket
import sys
import threading
from typing import Any, Literal

#: Messages per recvmmsg/sendmmsg call.
SLOTS = 64
#: Bytes per receive slot: any UDP payload (65,507 over IPv4, 65,527 over IPv6) fits whole.
SLOT_BYTES = 65_536
#: Room for one sockaddr (sockaddr_storage).
NAME_BYTES = 128
MSG_DONTWAIT = 0x40


class Iovec(ctypes.Structure):
    """struct iovec"""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    """struct msghdr (Linux layout)"""

    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class Mmsghdr(ctypes.Structure):
    """struct mmsghdr"""

    _fields_ = [("msg_hdr", Msghdr), ("msg_len", ctypes.c_uint)]


_MMSG = ctypes.sizeof(Mmsghdr)
_IOV = ctypes.sizeof(Iovec)
_PTR = ctypes.sizeof(ctypes.c_void_p)
#: One machine word (pointer and size_t alike) for both memoryview casts and arrays.
_WORD: Literal["Q", "I"] = "Q" if _PTR == 8 else "I"
_LEN_OFF = Mmsghdr.msg_len.offset
_NAME_OFF = Msghdr.msg_name.offset
_NAMELEN_OFF = Msghdr.msg_namelen.offset


def _load() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # PyDLL: call without releasing the GIL. The calls never block (MSG_DONTWAIT), and
        # giving up the GIL to another thread of the process costs the relay a switch
        # interval's wait to get it back (tens of microseconds on an echo round trip).
        libc = ctypes.PyDLL(None, use_errno=True)
        recvmmsg = libc.recvmmsg
        sendmmsg = libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    sendmmsg.restype = ctypes.c_int
    # the strided views below assume natural alignment of every field we touch
    if _MMSG % _PTR or _LEN_OFF % 4 or _NAMELEN_OFF % 4 or _IOV != 2 * _PTR:
        return None
    if ctypes.sizeof(ctypes.c_size_t) != _PTR or array.array(_WORD).itemsize != _PTR:
        return None
    return recvmmsg, sendmmsg


_CALLS = _load()


def available() -> bool:
    """True when recvmmsg/sendmmsg can be called (Linux with a libc that has them)."""
    return _CALLS is not None


def _strided(
    raw: memoryview, fmt: Literal["Q", "I"], size: int, offset: int, stride: int
) -> memoryview:
    """A view of one field of every element of an array of structures."""
    return raw.cast(fmt)[offset // size :: stride // size]


class MmsgArena:
    """Preallocated vectors and buffers for batched receive and send; see the module doc."""

    def __init__(self, slots: int = SLOTS, slot_bytes: int = SLOT_BYTES) -> None:
        assert _CALLS is not None, "recvmmsg/sendmmsg unavailable"
        self._recvmmsg, self._sendmmsg = _CALLS
        self.slots = slots
        self._data = mmap.mmap(-1, slots * slot_bytes)
        self._data_c = (ctypes.c_char * (slots * slot_bytes)).from_buffer(self._data)
        #: slot i's bytes are view[i * slot_bytes : i * slot_bytes + length]
        self.view = memoryview(self._data)
        self.slot_bytes = slot_bytes
        base = ctypes.addressof(self._data_c)
        self._names = ctypes.create_string_buffer(slots * NAME_BYTES)
        names = ctypes.addressof(self._names)
        self._recv = (Mmsghdr * slots)()
        self._recv_iov = (Iovec * slots)()
        self._up = (Mmsghdr * slots)()
        self._up_proxied = (Mmsghdr * slots)()
        self._reply = (Mmsghdr * slots)()
        self._send_iov = (Iovec * (2 * slots))()
        send_iov = ctypes.addressof(self._send_iov)
        for i in range(slots):
            data = base + i * slot_bytes
            self._recv_iov[i].iov_base = data
            self._recv_iov[i].iov_len = slot_bytes
            hdr = self._recv[i].msg_hdr
            hdr.msg_name = names + i * NAME_BYTES
            hdr.msg_namelen = NAME_BYTES
            hdr.msg_iov = ctypes.addressof(self._recv_iov) + i * _IOV
            hdr.msg_iovlen = 1
            self._send_iov[2 * i + 1].iov_base = data
            for vec, first, count in (
                (self._up, 2 * i + 1, 1),
                (self._up_proxied, 2 * i, 2),
                (self._reply, 2 * i + 1, 1),
            ):
                vec[i].msg_hdr.msg_iov = send_iov + first * _IOV
                vec[i].msg_hdr.msg_iovlen = count
        self._recv_addr = ctypes.addressof(self._recv)
        self._up_addr = ctypes.addressof(self._up)
        self._up_proxied_addr = ctypes.addressof(self._up_proxied)
        self._reply_addr = ctypes.addressof(self._reply)
        recv = memoryview(self._recv).cast("B")
        self._recv_lens = _strided(recv, "I", 4, _LEN_OFF, _MMSG)
        self._recv_namelens = _strided(recv, "I", 4, _NAMELEN_OFF, _MMSG)
        self._names_view = memoryview(self._names).cast("B")
        iov = memoryview(self._send_iov).cast("B")
        self._payload_lens = _strided(iov, _WORD, _PTR, _IOV + _PTR, 2 * _IOV)
        self._header_bases = _strided(iov, _WORD, _PTR, 0, 2 * _IOV)
        self._header_lens = _strided(iov, _WORD, _PTR, _PTR, 2 * _IOV)
        reply = memoryview(self._reply).cast("B")
        self._reply_names = _strided(reply, _WORD, _PTR, _NAME_OFF, _MMSG)
        self._reply_namelens = _strided(reply, "I", 4, _NAMELEN_OFF, _MMSG)
        self._full = array.array("I", [NAME_BYTES]) * slots

    # -- receive -------------------------------------------------------------------------
    def recv(self, fd: int) -> int:
        """recvmmsg into all slots, without waiting: the count received, or -errno."""
        self._recv_namelens[:] = self._full
        n: int = self._recvmmsg(fd, self._recv_addr, self.slots, MSG_DONTWAIT, None)
        return n if n >= 0 else -ctypes.get_errno()

    def lengths(self, n: int) -> list[int]:
        """The sizes of the first `n` received datagrams."""
        lens: list[int] = self._recv_lens[:n].tolist()
        return lens

    def sources(self, n: int) -> list[bytes]:
        """The raw source sockaddr of each of the first `n` received datagrams."""
        names = bytes(self._names_view[: n * NAME_BYTES])
        namelens = self._recv_namelens[:n].tolist()
        return [names[i * NAME_BYTES : i * NAME_BYTES + namelens[i]] for i in range(n)]

    # -- send ----------------------------------------------------------------------------
    def send_up(
        self, fd: int, start: int, count: int, lens: list[int], header: tuple[int, int] | None
    ) -> int:
        """sendmmsg slots [start, start+count) (sizes `lens`, the run's own) on the
        connected `fd`, each behind `header` (address, length) when given; count or -errno."""
        end = start + count
        self._payload_lens[start:end] = array.array(_WORD, lens)
        if header is None:
            vec = self._up_addr
        else:
            self._header_bases[start:end] = array.array(_WORD, [header[0]]) * count
            self._header_lens[start:end] = array.array(_WORD, [header[1]]) * count
            vec = self._up_proxied_addr
        return self._send(fd, vec, start, count)

    def send_replies(
        self, fd: int, start: int, count: int, lens: list[int], name: tuple[int, int]
    ) -> int:
        """sendmmsg slots [start, start+count) (sizes `lens`) from `fd` to the sockaddr
        `name` (address, length); count or -errno."""
        end = start + count
        self._payload_lens[start:end] = array.array(_WORD, lens)
        self._reply_names[start:end] = array.array(_WORD, [name[0]]) * count
        self._reply_namelens[start:end] = array.array("I", [name[1]]) * count
        return self._send(fd, self._reply_addr, start, count)

    def _send(self, fd: int, vec: int, start: int, count: int) -> int:
        n: int = self._sendmmsg(fd, vec + start * _MMSG, count, MSG_DONTWAIT)
        return n if n >= 0 else -ctypes.get_errno()


_local = threading.local()


def arena() -> MmsgArena:
    """This thread's arena (created on first use)."""
    found: MmsgArena | None = getattr(_local, "arena", None)
    if found is None:
        found = _local.arena = MmsgArena()
    return found


def sockaddr_tuple(raw: bytes) -> tuple[str, int] | tuple[str, int, int, int]:
    """A raw sockaddr_in / sockaddr_in6 as the address tuple `socket.recvfrom` returns."""
    family = int.from_bytes(raw[0:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 28:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        scope = int.from_bytes(raw[24:28], sys.byteorder)
        if scope and host.lower().startswith("fe80:"):
            try:
                host = f"{host}%{socket.if_indextoname(scope)}"
            except OSError:
                host = f"{host}%{scope}"
        return host, port, int.from_bytes(raw[4:8], "big"), scope
    raise ValueError(f"unexpected address family {family}")


def sockaddr_raw(addr: tuple[str, int] | tuple[str, int, int, int]) -> bytes:
    """The raw sockaddr the kernel reports for an address tuple (`sockaddr_tuple` reversed):
    a session first seen by a plain `recvfrom` gets the same key a `recvmmsg` would give."""
    port = int(addr[1]).to_bytes(2, "big")
    if len(addr) == 2:
        family = int(socket.AF_INET).to_bytes(2, sys.byteorder)
        return family + port + socket.inet_pton(socket.AF_INET, addr[0]) + bytes(8)
    family = int(socket.AF_INET6).to_bytes(2, sys.byteorder)
    host = socket.inet_pton(socket.AF_INET6, addr[0].split("%", 1)[0])
    flowinfo = int(addr[2]).to_bytes(4, "big")
    return family + port + flowinfo + host + int(addr[3]).to_bytes(4, sys.byteorder)
