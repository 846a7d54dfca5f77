"""Zero-copy plumbing: `os.splice` socket -> pipe -> socket, bytes never enter Python.

The relay (`relay.Relay`) splices a direction once it carries bulk data. Pipes come from a
`PipePool` (one per listener) only while a direction has bytes in flight and go back to it
as soon as the pipe is empty, so an idle connection holds no pipe at all; pooled pipes are
sized once with F_SETPIPE_SZ. Sockets are non-blocking and every splice uses
SPLICE_F_NONBLOCK | SPLICE_F_MOVE (`SPLICE_FLAGS`), so readiness events drive it.
`splice_supported()` says whether this platform has it (else the relay only copies).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os

logger = logging.getLogger(__name__)

PIPE_SIZE = 1024 * 1024
POOL_MAX = 128
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


@functools.cache
def splice_supported() -> bool:
    """True when `os.splice` exists and works on this kernel (probed once per process)."""
    if not hasattr(os, "splice"):
        return False
    try:
        r, w = os.pipe()
    except OSError:
        return False
    try:
        r2, w2 = os.pipe()
        try:
            os.write(w, b"x")
            return os.splice(r, w2, 1, flags=SPLICE_FLAGS) == 1
        finally:
            os.close(r2)
            os.close(w2)
    except OSError:
        return False
    finally:
        os.close(r)
        os.close(w)


class PipePool:
    """Non-blocking pipe pairs for splicing, reused across connections of one listener."""

    __slots__ = ("_free", "max_free", "size")

    def __init__(self, *, size: int = PIPE_SIZE, max_free: int = POOL_MAX) -> None:
        self._free: list[tuple[int, int]] = []
        self.size = size
        self.max_free = max_free

    def acquire(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep default
            fcntl.fcntl(w, _F_SETPIPE_SZ, self.size)
        return r, w

    def release(self, pipe: tuple[int, int], *, clean: bool) -> None:
        """Return an empty pipe to the pool; a pipe that may hold bytes is closed."""
        if clean and len(self._free) < self.max_free:
            self._free.append(pipe)
            return
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        while self._free:
            r, w = self._free.pop()
            os.close(r)
            os.close(w)
