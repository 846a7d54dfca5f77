"""The relay's batched hot path: `recvmmsg`/`sendmmsg` (see `mmsg`) instead of one system
call per datagram and direction.

`BatchedUdpRelay` is a `UdpRelay` whose two readiness callbacks move up to `mmsg.SLOTS`
datagrams per system call. Latency first: each wake-up takes its first datagram the plain
way (`recvfrom_into` + `send`, or `recv_into` + `sendto`, as `UdpRelay` does), so a lone
query or reply costs no vector set-up; only what queued behind it is batched. A session
opened by that plain read is keyed by `mmsg.sockaddr_raw` of its address, the bytes a
`recvmmsg` reports for the same source. From clients: one `recvmmsg` on the listening
socket, the batch is cut into runs of consecutive datagrams from one source address (looked
up by the raw sockaddr bytes, so no address tuple is built per datagram), and each run goes to its
session's connected upstream socket in one `sendmmsg` (with the session's PROXY v2 header as
a second iovec when the route asks for it). From a backend: one `recvmmsg` on the session's
upstream socket and one `sendmmsg` to the client from the listening socket. Sessions,
admission, counters, hooks, idle times, errors and logs behave exactly as in `UdpRelay`;
counters and idle times are updated once per run or batch. A run that fails part way is
retried after the failing datagram (counted as `upstream_error`, or lost on the way back as
in the per-datagram path); a full send buffer drops the rest of the run.

`ENABLED` (True where `mmsg.available()`) picks this relay in `serve_udp`; tests switch
it to run every UDP test through both paths.
"""

from __future__ import annotations

import errno
import logging
import socket

from labelproxy.streams.hooks import Hook
from labelproxy.streams.udp.mmsg import MmsgArena, arena, available, sockaddr_raw, sockaddr_tuple
from labelproxy.streams.udp.relay import BATCH, PENDING_LIMIT, UdpRelay
from labelproxy.streams.udp.session import RawRefs, UdpSession
from labelproxy.streams.udp.sockets import SockAddr

logger = logging.getLogger(__name__)

#: Use the batched relay when the platform allows it.
ENABLED = available()

_EAGAIN = -errno.EAGAIN
_EINTR = -errno.EINTR
_ECONNREFUSED = -errno.ECONNREFUSED


class BatchedUdpRelay(UdpRelay):
    """`UdpRelay` with recvmmsg/sendmmsg callbacks; see the module docstring."""

    def start(self) -> None:
        self._arena: MmsgArena = arena()
        self._rounds = max(1, BATCH // self._arena.slots)
        self._by_raw: dict[bytes, UdpSession] = {}
        super().start()

    def close_session(self, session: UdpSession, reason: str) -> None:
        refs = session.raw
        if not session.closed and refs is not None and self._by_raw.get(refs.key) is session:
            del self._by_raw[refs.key]
        super().close_session(session, reason)

    def _open_session(self, addr: SockAddr) -> UdpSession | None:
        session = super()._open_session(addr)
        if session is not None:
            self._index(session, sockaddr_raw(addr))
        return session

    def _index(self, session: UdpSession, key: bytes) -> None:
        """Key `session` by its client's raw sockaddr (and keep C copies for replies)."""
        session.raw = RawRefs(key, session.header)
        self._by_raw[key] = session

    def _session_for(self, key: bytes) -> UdpSession | None:
        """The session of the raw source `key`, opened if new (None: refused, counted by
        the hooks)."""
        session = self.sessions.get(sockaddr_tuple(key))
        if session is None:
            return self._open_session(sockaddr_tuple(key))
        if session.raw is None or session.raw.key != key:
            self._index(session, key)
        return session

    # -- clients -> backends -------------------------------------------------------------
    PLAIN_READS = 1  # the first datagram of a wake-up; the rest in batches

    def _client_batches(self, now: float, hooks: tuple[Hook, ...]) -> tuple[int, int, int, bool]:
        ar = self._arena
        fd = self.listener.fileno()
        count = nbytes = errors = 0
        for _ in range(self._rounds):
            n = ar.recv(fd)
            if n <= 0:
                if n < 0 and n not in (_EAGAIN, _EINTR):  # never fatal; see _rearm
                    logger.debug("udp listener %s: errno %d", self.live.spec.key, -n)
                    return count, nbytes, errors, True
                break
            keys = ar.sources(n)
            lens = ar.lengths(n)
            first = keys[0]
            if keys[-1] == first and keys.count(first) == n:
                c, b, e = self._run(first, 0, n, lens, now=now, hooks=hooks)
                count, nbytes, errors = count + c, nbytes + b, errors + e
            else:
                start = 0
                while start < n:
                    key = keys[start]
                    end = start + 1
                    while end < n and keys[end] == key:
                        end += 1
                    c, b, e = self._run(key, start, end, lens, now=now, hooks=hooks)
                    count, nbytes, errors = count + c, nbytes + b, errors + e
                    start = end
            if n < ar.slots:
                break
        return count, nbytes, errors, False

    def _run(
        self,
        key: bytes,
        start: int,
        end: int,
        lens: list[int],
        *,
        now: float,
        hooks: tuple[Hook, ...],
    ) -> tuple[int, int, int]:
        """Forward received slots [start, end), all from `key`: (sent, bytes, errors)."""
        session = self._by_raw.get(key)
        while session is None:  # each datagram of a refused source is refused (and counted)
            session = self._session_for(key)
            if session is None:
                start += 1
                if start == end:
                    return 0, 0, 0
        session.last_active = now
        sock = session.sock
        if sock is None:
            errors = 0
            pending = session.pending
            view, size = self._arena.view, self._arena.slot_bytes
            wake = self.wake
            held = wake is not None and session in wake.held
            for i in range(start, end):
                if held and wake is not None:  # its container wakes (`wakequeue`)
                    wake.queue(session, view[i * size : i * size + lens[i]])
                elif pending is not None and len(pending) < PENDING_LIMIT:
                    pending.append(bytes(view[i * size : i * size + lens[i]]))
                else:
                    errors += 1
            return 0, 0, errors
        refs = session.raw
        header = refs.header if refs is not None else None
        fd = sock.fileno()
        send_up = self._arena.send_up
        sent = nbytes = errors = 0
        pos = start
        while pos < end:
            r = send_up(fd, pos, end - pos, lens[pos:end], header)
            if r > 0:
                done = lens[pos : pos + r]
                b = sum(done)
                sent += r
                nbytes += b
                for hook in hooks:
                    for size in done:
                        hook.on_chunk(session.conn, "in", size)
                pos += r
            elif r == _EINTR:
                continue
            elif r == _EAGAIN:  # the upstream socket's buffer is full: drop the rest
                errors += end - pos
                break
            else:  # refused (ICMP), too large with the header: drop that one datagram
                errors += 1
                pos += 1
        session.conn.bytes_in += nbytes
        return sent, nbytes, errors

    # -- backends -> clients -------------------------------------------------------------
    def _upstream_batches(
        self, session: UdpSession, sock: socket.socket, hooks: tuple[Hook, ...]
    ) -> tuple[int, int, int, int]:
        refs = session.raw
        if refs is None:  # not indexed (cannot happen: `_open_session` indexes every one)
            return 0, 0, 0, 0
        ar = self._arena
        fd = sock.fileno()
        out = self.listener.fileno()
        conn = session.conn
        count = nbytes = errors = dropped = 0
        for _ in range(self._rounds):
            n = ar.recv(fd)
            if n < 0:
                if n == _EAGAIN:
                    break
                if n == _EINTR:
                    continue
                errors += 1
                if n == _ECONNREFUSED:  # ICMP port unreachable from the backend
                    continue
                logger.debug("udp upstream %s: errno %d", conn.backend, -n)
                break
            if n == 0:
                break
            lens = ar.lengths(n)
            pos = 0
            while pos < n:
                r = ar.send_replies(out, pos, n - pos, lens[pos:], refs.name)
                if r > 0:
                    done = lens[pos : pos + r]
                    count += r
                    nbytes += sum(done)
                    for hook in hooks:
                        for size in done:
                            hook.on_chunk(conn, "out", size)
                    pos += r
                elif r == _EINTR:
                    continue
                elif r == _EAGAIN:  # the client's side is full: these are lost
                    dropped += n - pos
                    break
                else:
                    dropped += 1
                    pos += 1
            if n < ar.slots:
                break
        return count, nbytes, errors, dropped
