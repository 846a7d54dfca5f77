"""The pump of one direction of a TCP relay: its state and the steps that move its bytes.

A `Half` reads socket fd `src_fd` and writes `dst_fd`. It carries the edge-triggered
readiness flags (`readable` for its source, `writable` for its destination), its staging
(`pending` bytes in copy mode, a pooled `pipe` holding `staged` bytes in splice mode) and
its EOF state (`OPEN`, `EOF` read but not yet propagated, `SHUT` propagated with SHUT_WR).
Its steps move bytes and update those flags; each returns the bytes it wrote to `dst_fd`
(the relay counts them) and raises `PumpError` when a socket fails. Which step runs next
is the relay's choice (`relay.Relay._pump`); a `Half` knows nothing of the connection.

- `copy`: one read into a process-wide 64 KiB buffer (`os.readv`), written on
  (`os.write`); what the destination does not take becomes `pending`. A short read (less
  than the buffer) means the socket was drained: `readable` is cleared without another
  read that would only fail with EAGAIN (an edge says when more comes), unless the source
  already signalled a hang-up (then it reads on to the EOF). A read that fills the buffer
  marks the direction as bulk: it switches to splice mode (when there is a `PipePool`).
- `splice_in`: `os.splice` source -> pooled pipe (bytes never enter Python); a fresh read
  below `SMALL_READ` switches the direction back to copy mode.
- `flush`: writes what is staged (pending bytes, or the pipe -> destination).
Everything here runs on the data loop (`loop.DataLoop`).
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Callable

from labelproxy.metrics import Direction
from labelproxy.streams.tcp.splice import SPLICE_FLAGS, PipePool

OPEN, EOF, SHUT = 0, 1, 2
COPY_BUFFER = 64 * 1024  # a read that fills it switches the direction to splice
SMALL_READ = 16 * 1024  # a fresh splice read below this goes back to copying
_BUF = bytearray(COPY_BUFFER)  # shared: always emptied (sent or copied) before returning
_VIEW = memoryview(_BUF)
_BUFS = [_BUF]


class PumpError(Exception):
    """A socket of a direction failed (the `OSError` is the cause); `reading`: its source;
    `written`: bytes the step wrote before it failed."""

    def __init__(self, error: OSError, *, reading: bool, written: int = 0) -> None:
        super().__init__(error)
        self.error = error
        self.reading = reading
        self.written = written


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
    """(data loop) One direction: reads socket fd `src_fd`, writes socket fd `dst_fd`."""

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

    # -- copy mode -----------------------------------------------------------------------
    def copy(self, pool: PipePool | None) -> int:
        """Read once into the shared buffer and write it on; the bytes written."""
        try:
            n = os.readv(self.src_fd, _BUFS)
        except BlockingIOError:
            self.readable = False
            return 0
        except OSError as exc:
            raise PumpError(exc, reading=True) from exc
        if n == 0:
            self.readable = False
            self.eof = EOF
            return 0
        if n < COPY_BUFFER:
            if not self.rdhup:  # a short read drained the socket; the next edge says more
                self.readable = False
        elif pool is not None:
            self.splice = True
        try:
            sent = os.write(self.dst_fd, _VIEW[:n] if n < COPY_BUFFER else _BUF)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise PumpError(exc, reading=False) from exc
        if sent < n:
            self.pending = bytes(_VIEW[sent:n])
            self.writable = False
        return sent

    def flush(self, pool: PipePool | None) -> int:
        """Write staged bytes until none are left or the destination is full; the bytes
        written (`writable` cleared when some stay staged)."""
        sent = 0
        try:
            if self.pending is not None:
                data = self.pending
                sent = os.write(self.dst_fd, data)
                if sent < len(data):
                    self.pending = data[sent:]
                    self.writable = False
                else:
                    self.pending = None
                return sent
            pipe = self.pipe
            assert pipe is not None
            while self.staged:
                n = os.splice(pipe[0], self.dst_fd, self.staged, flags=SPLICE_FLAGS)
                self.staged -= n
                sent += n
        except BlockingIOError:
            self.writable = False
            return sent
        except OSError as exc:
            raise PumpError(exc, reading=False, written=sent) from exc
        if not self.splice:
            self.drop_pipe(pool)
        return sent

    # -- splice mode ---------------------------------------------------------------------
    def splice_in(self, pool: PipePool, *, fresh: bool) -> None:
        """Splice what the source has into this direction's pipe (`staged`)."""
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = pool.acquire()
        try:
            n = os.splice(self.src_fd, pipe[1], pool.size, flags=SPLICE_FLAGS)
        except BlockingIOError:
            self.readable = False
            self.drop_pipe(pool)  # idle: the pipe goes back to the pool
            return
        except OSError as exc:
            raise PumpError(exc, reading=True) from exc
        if n == 0:
            self.readable = False
            self.eof = EOF
            self.drop_pipe(pool)
            return
        self.staged = n
        if fresh and n < SMALL_READ:
            self.splice = False  # looks interactive again: copy (the pipe goes once empty)

    def drop_pipe(self, pool: PipePool | None) -> None:
        """An empty pipe goes back to the pool (an idle direction holds none)."""
        pipe = self.pipe
        if pipe is not None and not self.staged:
            self.pipe = None
            assert pool is not None
            pool.release(pipe, clean=True)
