"""One direction of a TCP relay (`Half`) and raw-fd socket helpers the relay uses.

A `Half` reads socket fd `src_fd` and writes `dst_fd`; it carries the edge-triggered
readiness flags (`readable` for its source, `writable` for its destination), its staging
(`pending` bytes in copy mode, a pooled `pipe` holding `staged` bytes in splice mode) and its
EOF state (`OPEN`, `EOF` read but not yet propagated, `SHUT` propagated with SHUT_WR).
"""

from __future__ import annotations

import socket

from labelproxy.metrics import Direction

OPEN, EOF, SHUT = 0, 1, 2


def shutdown_write(fd: int) -> None:
    """shutdown(fd, SHUT_WR) on a raw socket fd (a throwaway socket object, fd kept)."""
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
        self.readable = True  # optimistic: the first read tells (EAGAIN clears it)
        self.rdhup = False  # src has signalled EOF/error: read until 0, not a short read
        self.writable = True
        self.pending: bytes | None = None  # copy mode: bytes dst did not take yet
        self.pipe: tuple[int, int] | None = None  # splice mode: staging pipe
        self.staged = 0  # bytes in the pipe
        self.splice = False
        self.eof = OPEN
