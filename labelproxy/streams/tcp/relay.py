"""The byte relay of one TCP connection, driven by edge-triggered epoll (no coroutine, no
event-loop handle per connection).

`Relay` moves bytes client -> upstream ("in") and upstream -> client ("out"), one
`pump.Half` per direction. Both sockets sit in the TCP data loop (`loop.DataLoop`,
IN|OUT|RDHUP, edge-triggered); per direction, "source readable" and "destination
writable" flags are set by an edge and cleared by an EAGAIN (or a short read), and `_pump`
runs the direction's steps while both are set: flush what is staged, then copy (or splice)
the next read.

Adaptive zero-copy, like HAProxy's splice-auto: a direction starts in copy mode and
switches to `os.splice` through a pooled pipe when a read fills the copy buffer (bulk); it
goes back to copy mode when a fresh read is small again (see `pump`). Buffering per
direction is bounded by one staging area (the pending bytes or the pipe); an idle
direction holds neither.

An EOF on one side is propagated as `shutdown(SHUT_WR)` on the other once everything read
was written (half-close), while the other direction keeps flowing; the relay ends when both
reached EOF, on an error, on the optional idle timeout, or on `abort`, and then tells its
listener (`owner.Owner.ended`), which releases and logs the connection. The relay adds the
bytes it moves to the connection's and the route's counters and hands each chunk's size
to the route's chunk hooks, never the bytes. `prefix` is written upstream before any client
byte (a PROXY header, bytes read after the client's own header); with `sniff=True` the first
client bytes are checked for a PROXY signature (a header from an untrusted client is refused;
bytes that are still only the start of one after `PEEK_DEADLINE` are relayed as they came).
Everything here runs on the data loop.
"""

from __future__ import annotations

import logging
import os

from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.proxyproto import PEEK_DEADLINE, looks_like_header
from labelproxy.streams.tcp.loop import HANGUP, READABLE, WRITABLE, Timer
from labelproxy.streams.tcp.owner import Owner
from labelproxy.streams.tcp.pump import EOF, SHUT, Half, PumpError, shutdown_write

logger = logging.getLogger(__name__)

_ROUNDS = 16  # reads per wake-up before yielding to other connections
_SNIFF_MAX = 12


class Relay:
    """(data loop) Relays a client and a connected upstream (raw, non-blocking socket fds
    the relay owns and closes) until both end."""

    __slots__ = (
        "_idle_handle",
        "_in",
        "_out",
        "_sniff",
        "_sniff_timer",
        "conn",
        "done",
        "last_active",
        "owner",
    )

    def __init__(
        self,
        owner: Owner,
        client: int,
        upstream: int,
        conn: ConnInfo,
        *,
        prefix: bytes = b"",
        sniff: bool = False,
    ) -> None:
        self.owner = owner
        self.conn = conn
        self._in = Half(client, upstream, "in")
        self._out = Half(upstream, client, "out")
        if prefix:
            self._in.pending = prefix
        self._sniff = bytearray() if sniff else None
        self._sniff_timer: Timer | None = None
        self._idle_handle: Timer | None = None
        self.last_active = 0.0
        self.done = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, *, upstream_events: int | None = None) -> None:
        """Begin relaying both ways (call once, from the loop). `upstream_events`: the
        upstream socket is already in the loop (the dialer put it there) and these are
        the readiness bits the dialer consumed; None: add it now."""
        loop = self.owner.loop
        loop.add(self._in.src_fd, self)
        if upstream_events is None:
            loop.add(self._out.src_fd, self)
        else:
            loop.targets[self._out.src_fd] = self
            self._out.readable = bool(upstream_events & READABLE)
            self._out.rdhup = bool(upstream_events & HANGUP)
        idle = self.owner.live.idle_timeout
        if idle:
            self.last_active = loop.time()
            self._idle_handle = loop.call_later(idle, self._check_idle)
        self._pump(self._in)
        if not self.done:
            self._pump(self._out)

    def abort(self, reason: str) -> None:
        """End the relay now: both sockets closed, the owner told (idempotent)."""
        if self.done:
            return
        self.done = True
        conn = self.conn
        if not conn.close_reason:
            conn.close_reason = reason
        owner = self.owner
        pool = owner.pool
        for half in (self._in, self._out):
            owner.loop.forget(half.src_fd)
            if half.pipe is not None and pool is not None:
                pool.release(half.pipe, clean=half.staged == 0)  # closed if it holds bytes
                half.pipe = None
            half.pending = None
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self._sniff_timer is not None:
            self._sniff_timer.cancel()
            self._sniff_timer = None
        for half in (self._in, self._out):
            try:  # noqa: SIM105 (hot path: no context manager per close)
                os.close(half.src_fd)
            except OSError:
                pass
        try:
            owner.ended(self)
        except Exception:
            logger.exception("route %s: connection close handler failed", conn.route)

    # -- readiness -----------------------------------------------------------------------
    def on_event(self, fd: int, events: int) -> None:
        if self.done:
            return
        if fd == self._in.src_fd:
            src, dst = self._in, self._out
        else:
            src, dst = self._out, self._in
        unblocked = bool(events & WRITABLE) and not dst.writable  # else no news for dst
        if unblocked:
            dst.writable = True
        if events & READABLE:
            src.readable = True
            if events & HANGUP:
                src.rdhup = True
            self._pump(src)
        if unblocked and not self.done:
            self._pump(dst)

    def _resume(self, half: Half) -> None:
        if not self.done:
            self._pump(half)

    def _pump(self, half: Half) -> None:
        """Write what is staged, then read and write while both ends are ready."""
        rounds = 0
        pool = self.owner.pool
        try:
            while True:
                if half.pending is not None or half.staged:
                    if not half.writable:
                        return
                    sent = half.flush(pool)
                    if sent:
                        self._count(half, sent)
                    if half.pending is not None or half.staged:
                        return
                if half.eof:
                    if half.eof == EOF:
                        self._shut(half)
                    return
                if not (half.readable and half.writable) or self.done:
                    return
                if rounds == _ROUNDS:  # fairness: let other connections run, then go on
                    self.owner.loop.call_soon(self._resume, half)
                    return
                rounds += 1
                if half.splice:
                    assert pool is not None
                    half.splice_in(pool, fresh=rounds == 1)  # the next turn flushes it
                elif self._sniff is not None and half is self._in:
                    if not self._sniff_client():
                        return
                else:
                    sent = half.copy(pool)
                    if sent:
                        self._count(half, sent)
        except PumpError as failure:
            if failure.written:
                self._count(half, failure.written)
            side = "client" if (half is self._in) == failure.reading else "upstream"
            logger.debug(
                "route %s: %s error on %s: %s", self.conn.route, side, half.direction, failure
            )
            self.abort(f"{side}_error")

    # -- bookkeeping ---------------------------------------------------------------------
    def _count(self, half: Half, n: int) -> None:
        """Account `n` relayed bytes: the connection's and the route's totals, the idle
        clock, and the hooks that want chunk sizes."""
        live = self.owner.live
        if live.idle_timeout:
            self.last_active = self.owner.loop.time()
        conn = self.conn
        if half.inbound:
            conn.bytes_in += n
            live.counters.bytes_in += n
        else:
            conn.bytes_out += n
            live.counters.bytes_out += n
        hooks = live.policy.chunk
        if hooks:
            for hook in hooks:
                hook.on_chunk(conn, half.direction, n)

    def _shut(self, half: Half) -> None:
        """src reached EOF and everything was written: propagate the half-close."""
        half.eof = SHUT
        other = self._out if half is self._in else self._in
        if other.eof == SHUT:  # both ways done: close() sends the FIN, no shutdown needed
            self.abort("eof")
            return
        try:  # noqa: SIM105 (hot path)
            shutdown_write(half.dst_fd)
        except OSError:
            pass

    def _sniff_client(self) -> bool:
        sniff = self._sniff
        assert sniff is not None
        half = self._in
        try:
            data = os.read(half.src_fd, _SNIFF_MAX - len(sniff))
        except BlockingIOError:
            half.readable = False
            return False
        except OSError as exc:
            raise PumpError(exc, reading=True) from exc
        sniff += data
        verdict = looks_like_header(bytes(sniff))
        if verdict is None and data:
            if self._sniff_timer is None:  # the start of a signature: only for so long
                self._sniff_timer = self.owner.loop.call_later(PEEK_DEADLINE, self._sniff_expired)
            return True
        if self._sniff_timer is not None:
            self._sniff_timer.cancel()
            self._sniff_timer = None
        if verdict:
            logger.info(
                "route %s: refused a PROXY header from untrusted client %s",
                self.conn.route,
                self.conn.peer[0],
            )
            self.abort("proxy_header")
            return False
        self._sniff = None
        if sniff:
            half.pending = bytes(sniff)
        if not data:  # EOF while sniffing: flush what came, then half-close
            half.readable = False
            half.eof = EOF
        return True

    def _sniff_expired(self) -> None:
        """The client's first bytes stayed the start of a PROXY signature (`PRO`) for
        `PEEK_DEADLINE`: not a header; relay them as they came."""
        self._sniff_timer = None
        sniff = self._sniff
        if self.done or sniff is None:
            return
        self._sniff = None
        half = self._in
        half.pending = bytes(sniff) if half.pending is None else half.pending + bytes(sniff)
        self._pump(half)

    def _check_idle(self) -> None:
        self._idle_handle = None
        idle = self.owner.live.idle_timeout
        if self.done or not idle:
            return
        loop = self.owner.loop
        idle_for = loop.time() - self.last_active
        if idle_for >= idle:
            logger.debug("route %s: idle for %.1fs, closing", self.conn.route, idle_for)
            self.abort("idle_timeout")
            return
        self._idle_handle = loop.call_later(idle - idle_for, self._check_idle)
