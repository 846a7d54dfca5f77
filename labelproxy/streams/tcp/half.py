"""One direction of a TCP relay (`Half`) and raw-fd socket helpers the relay uses.

A `Half` reads socket fd `src_fd` and writes `dst_fd`; it carries the edge-triggered
readiness flags (`readable` for its source, `writable` for its destination), its staging
(`pending` bytes in copy mode, a pooled `pipe` holding `staged` bytes in splice mode) and its
EOF state (`OPEN`, `EOF` read but not yet propagated, `SHUT` propagated with SHUT_WR).
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Callable

from labelproxy.metrics import Direction

OPEN, EOF, SHUT = 0, 1, 2


def _libc_shutdown() -> Callable[[int, int], int] | None:
    try:
        func = ctypes.PyDLL(None, use_errno=True).shutdown
    except (AttributeError, OSError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int)
    func.restype = ctypes.c_int
    return func


_SHUTDOWN = _libc_shutdown()


def shutdown_write(fd: int) -> None:
    """shutdown(fd, SHUT_WR) on a raw socket fd; raises OSError like `socket.shutdown`.

    Calls libc directly (one system call); without it, a throwaway socket object carries
    the fd (CPython then also asks the kernel for the socket's name)."""
    if _SHUTDOWN is not None:
        if _SHUTDOWN(fd, socket.SHUT_WR) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return
    carrier = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        carrier.shutdown(socket.SHUT_WR)
    finally:
        carrier.detach()


class Half:
    """One direction: reads socket fd `src_fd`, writes socket fd `dst_fd`."""

    __slots__ = (
        "direction",
        "dst_fd",
        "eof",
        "inbound",
        "pending",
        "pipe",
        "rdhup",
        "readable",
        "splice",
        "src_fd",
        "staged",
        "writable",
    )

    def __init__(self, src_fd: int, dst_fd: int, direction: Direction) -> None:
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.direction: Direction = direction
        self.inbound = direction == "in"  # client -> upstream
        self.readable = True  # optimistic: the first read tells (EAGAIN clears it)
        self.rdhup = False  # src has signalled EOF/error: read until 0, not a short read
        self.writable = True
        self.pending: bytes | None = None  # copy mode: bytes dst did not take yet
        self.pipe: tuple[int, int] | None = None  # splice mode: staging pipe
        self.staged = 0  # bytes in the pipe
        self.splice = False
        self.eof = OPEN
