"""Moving bytes for one direction of a relay: copy mode and splice mode.

`Transfer` is the part of `relay.Relay` that touches the sockets. Copy mode reads into a
process-wide 64 KiB buffer (`os.readv`) and writes it on (`os.write`); what the destination
does not take is kept as the direction's `pending` bytes. A read that fills the buffer marks
the direction as bulk and it switches to splice mode: `os.splice` socket -> pooled pipe ->
socket, bytes never entering Python. A fresh splice read below `SMALL_READ` switches it back.
A short copy read (less than the buffer) means the socket was drained: the readable flag is
cleared without another read that would only fail with EAGAIN (an edge says when more comes),
unless the source already signalled a hang-up (then it reads on to the EOF).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

from labelproxy.streams.live import LiveRoute
from labelproxy.streams.tcp.half import EOF, Half
from labelproxy.streams.tcp.loop import DataLoop
from labelproxy.streams.tcp.splice import SPLICE_FLAGS, PipePool

if TYPE_CHECKING:
    from labelproxy.streams.tcp.relay import Relay

COPY_BUFFER = 64 * 1024  # a read that fills it switches the direction to splice
SMALL_READ = 16 * 1024  # a fresh splice read below this goes back to copying
_BUF = bytearray(COPY_BUFFER)  # shared: always emptied (sent or copied) before returning
_VIEW = memoryview(_BUF)
_BUFS = [_BUF]


class Owner(Protocol):
    """What a relay needs from its listener."""

    loop: DataLoop
    pool: PipePool | None
    live: LiveRoute

    def relay_done(self, relay: Relay) -> None: ...


class Transfer:
    """Copy and splice steps of a relay direction (mixed into `relay.Relay`)."""

    __slots__ = ()
    owner: Owner

    def _count(self, half: Half, n: int) -> None:
        raise NotImplementedError

    def _fail(self, half: Half, exc: OSError, *, reading: bool) -> None:
        raise NotImplementedError

    # -- copy mode -----------------------------------------------------------------------
    def _copy(self, half: Half) -> bool:
        """recv into the shared buffer and send it on; False when there is nothing more."""
        try:
            n = os.readv(half.src_fd, _BUFS)
        except BlockingIOError:
            half.readable = False
            return False
        except OSError as exc:
            self._fail(half, exc, reading=True)
            return False
        if n == 0:
            half.readable = False
            half.eof = EOF
            return True
        if n < COPY_BUFFER:
            if not half.rdhup:  # a short read drained the socket; the next edge says more
                half.readable = False
        elif self.owner.pool is not None:
            half.splice = True
        try:
            sent = os.write(half.dst_fd, _VIEW[:n] if n < COPY_BUFFER else _BUF)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(half, exc, reading=False)
            return False
        if sent:
            self._count(half, sent)
        if sent < n:
            half.pending = bytes(_VIEW[sent:n])
            half.writable = False
            return False
        return True

    def _flush(self, half: Half) -> bool:
        """Write staged bytes; True once none are left."""
        try:
            if half.pending is not None:
                data = half.pending
                sent = os.write(half.dst_fd, data)
                self._count(half, sent)
                if sent < len(data):
                    half.pending = data[sent:]
                    half.writable = False
                    return False
                half.pending = None
                return True
            pipe = half.pipe
            assert pipe is not None
            while half.staged:
                sent = os.splice(pipe[0], half.dst_fd, half.staged, flags=SPLICE_FLAGS)
                half.staged -= sent
                self._count(half, sent)
        except BlockingIOError:
            half.writable = False
            return False
        except OSError as exc:
            self._fail(half, exc, reading=False)
            return False
        if not half.splice:
            self._drop_pipe(half)
        return True

    # -- splice mode ---------------------------------------------------------------------
    def _splice_in(self, half: Half, *, fresh: bool) -> bool:
        pool = self.owner.pool
        assert pool is not None
        pipe = half.pipe
        if pipe is None:
            pipe = half.pipe = pool.acquire()
        try:
            n = os.splice(half.src_fd, pipe[1], pool.size, flags=SPLICE_FLAGS)
        except BlockingIOError:
            half.readable = False
            self._drop_pipe(half)  # idle: the pipe goes back to the pool
            return False
        except OSError as exc:
            self._fail(half, exc, reading=True)
            return False
        if n == 0:
            half.readable = False
            half.eof = EOF
            self._drop_pipe(half)
            return True
        half.staged = n
        if fresh and n < SMALL_READ:
            half.splice = False  # looks interactive again: copy (the pipe goes once empty)
        return True

    def _drop_pipe(self, half: Half) -> None:
        pipe = half.pipe
        if pipe is not None and not half.staged:
            half.pipe = None
            pool = self.owner.pool
            assert pool is not None
            pool.release(pipe, clean=True)
