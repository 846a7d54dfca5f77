"""The byte relay of one TCP connection, driven by event-loop callbacks (no coroutine per byte).

`Relay` moves bytes client -> upstream ("in") and upstream -> client ("out") with the loop's
`add_reader` / `add_writer`: each direction reads while its staging area is empty and waits
for the destination to be writable while it is not, so buffering per direction is bounded by
one staging area. An EOF on one side is propagated as `shutdown(SHUT_WR)` on the other once
everything read was written (half-close), while the other direction keeps flowing; the relay
ends when both directions reached EOF, on an error, on the optional idle timeout, or when
`abort` is called. Hooks get each chunk's size (`on_chunk`), never the bytes.

This class is the portable copy path (`recv_into` a buffer, `send`); `splice.SpliceRelay`
overrides the three staging methods to move bytes through a pipe with `os.splice` instead.
Bytes that must be written before relaying starts (a PROXY header for the upstream, bytes a
client sent after its own PROXY header) are given as `prefix`. With `sniff=True` the first
client bytes are checked for a PROXY signature (a header from an untrusted client is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from labelproxy.metrics import Direction
from labelproxy.streams.hooks import BaseHook, ConnInfo, Hook
from labelproxy.streams.proxyproto import looks_like_header

logger = logging.getLogger(__name__)

COPY_BUFFER = 64 * 1024
_SNIFF_MAX = 12


class Half:
    """One direction of a relay: reads `src`, writes `dst`."""

    __slots__ = (
        "buf",
        "direction",
        "dst",
        "end",
        "eof",
        "pipe",
        "prefix",
        "reading",
        "src",
        "staged",
        "writing",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        self.src = src
        self.dst = dst
        self.direction: Direction = direction
        self.prefix = b""
        self.eof = False
        self.reading = False
        self.writing = False
        self.staged = 0  # bytes read from src and not yet written to dst
        self.buf: bytearray | None = None  # copy path staging
        self.end = 0  # copy path: staged bytes are buf[end - staged:end]
        self.pipe: tuple[int, int] | None = None  # splice path staging


class Relay:
    """Relays one accepted client socket and one connected upstream socket until both end."""

    __slots__ = (
        "_chunk_hooks",
        "_hooks",
        "_hooks_seen",
        "_idle",
        "_idle_handle",
        "_in",
        "_on_done",
        "_out",
        "_sniff",
        "client",
        "conn",
        "done",
        "last_active",
        "loop",
        "upstream",
    )

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        conn: ConnInfo,
        hooks: Callable[[], tuple[Hook, ...]],
        on_done: Callable[[Relay], None],
        prefix: bytes = b"",
        idle_timeout: float | None = None,
        sniff: bool = False,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.upstream = upstream
        self.conn = conn
        self._hooks = hooks
        self._hooks_seen: tuple[Hook, ...] | None = None
        self._chunk_hooks: tuple[Hook, ...] = ()
        self._on_done = on_done
        self._in = Half(client, upstream, "in")
        self._out = Half(upstream, client, "out")
        self._in.prefix = prefix
        self._sniff = bytearray() if sniff else None
        self._idle = idle_timeout
        self._idle_handle: asyncio.TimerHandle | None = None
        self.last_active = self.loop.time()
        self.done = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Begin relaying both ways (call once, from the loop)."""
        for half in (self._in, self._out):
            if half.prefix:
                self._want_write(half)
            else:
                self._want_read(half)
        if self._idle:
            self._idle_handle = self.loop.call_later(self._idle, self._check_idle)

    def abort(self, reason: str) -> None:
        """End the relay now: both sockets closed, `on_done` called (idempotent)."""
        if self.done:
            return
        self.done = True
        if not self.conn.close_reason:
            self.conn.close_reason = reason
        for half in (self._in, self._out):
            self._stop(half)
            self._release_staging(half)
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()
        try:
            self._on_done(self)
        except Exception:
            logger.exception("route %s: connection close handler failed", self.conn.route)

    # -- staging: the copy path (splice.SpliceRelay overrides these) ---------------------
    def _pull(self, half: Half) -> int:
        """Read from src into staging: bytes read, 0 on EOF; raises BlockingIOError."""
        if half.buf is None:
            half.buf = bytearray(COPY_BUFFER)
        n = half.src.recv_into(half.buf)
        half.end = n
        half.staged = n
        return n

    def _push(self, half: Half) -> int:
        """Write staged bytes to dst: bytes written; raises BlockingIOError."""
        assert half.buf is not None
        start = half.end - half.staged
        with memoryview(half.buf) as view:
            n = half.dst.send(view[start : half.end])
        half.staged -= n
        return n

    def _release_staging(self, half: Half) -> None:
        """Give staging memory back while a direction is idle (idle connections stay small)."""
        half.buf = None

    # -- event plumbing ------------------------------------------------------------------
    def _want_read(self, half: Half) -> None:
        if half.writing:
            self.loop.remove_writer(half.dst.fileno())
            half.writing = False
        if not half.reading:
            self.loop.add_reader(half.src.fileno(), self._on_readable, half)
            half.reading = True

    def _want_write(self, half: Half) -> None:
        if half.reading:
            self.loop.remove_reader(half.src.fileno())
            half.reading = False
        if not half.writing:
            self.loop.add_writer(half.dst.fileno(), self._on_writable, half)
            half.writing = True

    def _stop(self, half: Half) -> None:
        if half.reading:
            self.loop.remove_reader(half.src.fileno())
            half.reading = False
        if half.writing:
            self.loop.remove_writer(half.dst.fileno())
            half.writing = False

    def _on_readable(self, half: Half) -> None:
        if self.done:
            return
        if self._sniff is not None and half is self._in:
            self._sniff_client()
            return
        try:
            n = self._pull(half)
        except BlockingIOError:
            if not half.staged:
                self._release_staging(half)
            return
        except OSError as exc:
            self._fail(half, exc, reading=True)
            return
        if n == 0:
            self._stop(half)
            self._release_staging(half)
            self._finish_half(half)
            return
        self._drain(half)

    def _on_writable(self, half: Half) -> None:
        if self.done:
            return
        if half.prefix:
            try:
                n = half.dst.send(half.prefix)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(half, exc, reading=False)
                return
            self._count(half, n)
            half.prefix = half.prefix[n:]
            if half.prefix:
                return
            if not half.staged:
                if half.eof:
                    self._stop(half)
                    self._finish_half(half)
                else:
                    self._want_read(half)
                return
        self._drain(half)

    def _drain(self, half: Half) -> None:
        """Write what is staged; read again once empty, else wait for dst to be writable."""
        try:
            while half.staged:
                n = self._push(half)
                self._count(half, n)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._fail(half, exc, reading=False)
            return
        if half.staged:
            self._want_write(half)
            return
        self._release_staging(half)
        if half.eof:
            self._stop(half)
            self._finish_half(half)
        else:
            self._want_read(half)

    def _count(self, half: Half, n: int) -> None:
        if n <= 0:
            return
        self.last_active = self.loop.time()
        hooks = self._hooks()
        if hooks is not self._hooks_seen:
            self._hooks_seen = hooks
            self._chunk_hooks = tuple(
                h for h in hooks if getattr(type(h), "on_chunk", None) is not BaseHook.on_chunk
            )
        for hook in self._chunk_hooks:
            hook.on_chunk(self.conn, half.direction, n)

    def _finish_half(self, half: Half) -> None:
        """src reached EOF and everything was written: propagate the half-close."""
        half.eof = True
        with contextlib.suppress(OSError):
            half.dst.shutdown(socket.SHUT_WR)
        if self._in.eof and self._out.eof and not self._in.staged and not self._out.staged:
            self.abort("eof")

    def _fail(self, half: Half, exc: OSError, *, reading: bool) -> None:
        side = "client" if (half is self._in) == reading else "upstream"
        logger.debug("route %s: %s error on %s: %s", self.conn.route, side, half.direction, exc)
        self.abort(f"{side}_error")

    def _sniff_client(self) -> None:
        assert self._sniff is not None
        try:
            data = self.client.recv(_SNIFF_MAX - len(self._sniff))
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(self._in, exc, reading=True)
            return
        self._sniff += data
        verdict = looks_like_header(bytes(self._sniff))
        if verdict is None and data:
            return
        if verdict:
            logger.info(
                "route %s: refused a PROXY header from untrusted client %s",
                self.conn.route,
                self.conn.peer[0],
            )
            self.conn.close_reason = "proxy_header"
            self.abort("proxy_header")
            return
        self._in.prefix = bytes(self._sniff)
        self._sniff = None
        if not data:  # EOF while sniffing: flush what came, then half-close
            self._in.eof = True
        if self._in.prefix:
            self._want_write(self._in)
        else:
            self._stop(self._in)
            self._finish_half(self._in)

    def _check_idle(self) -> None:
        self._idle_handle = None
        if self.done or not self._idle:
            return
        idle_for = self.loop.time() - self.last_active
        if idle_for >= self._idle:
            logger.debug("route %s: idle for %.1fs, closing", self.conn.route, idle_for)
            self.abort("idle_timeout")
            return
        self._idle_handle = self.loop.call_later(self._idle - idle_for, self._check_idle)
