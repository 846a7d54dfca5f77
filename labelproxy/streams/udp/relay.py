"""The UDP relay's hot path: sessions keyed by client address, driven by event-loop readers.

`UdpRelay` owns a route's listening socket and its sessions. Both directions run in plain
callbacks registered with the asyncio (uvloop) loop's `add_reader`: each callback drains its
non-blocking socket with `recvfrom_into`/`recv_into` into one preallocated 64 KiB buffer and
forwards `memoryview` slices of it, so a datagram costs two system calls and no copy. The
relay adds the volume it moves (datagrams, bytes, datagrams lost) to the route's counters
once per batch; hooks that want per-chunk sizes are called per datagram.

A session is created by the first datagram from a new client address while the route
admits: admission (`LiveRoute.admit`: ACL, session caps; it counts the session), backend
choice, then its own connected upstream socket (a backend given by host name is resolved in
a task first; up to `PENDING_LIMIT` datagrams wait for it). Replies go back to the client
from the listening socket. A session ends when it is idle for the route's `idle_timeout`
(traffic either way resets it), when its backend left the route, or when the drain ends
(`drain.Drain`, told of every session that ends); `live.release` is called exactly once and
one access-log record is written. Everything here runs on the asyncio loop.

This module is longer than most (about 400 lines): the session table and the two readiness
callbacks that use it are one class, so that a datagram's path is direct method calls on
it, and `batched.BatchedUdpRelay` overrides both halves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

from labelproxy.spec import Backend
from labelproxy.streams.accesslog import log_closed, log_opened
from labelproxy.streams.addresses import literal_family, unmapped
from labelproxy.streams.drain import Drain
from labelproxy.streams.hooks import ConnInfo, Hook
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.proxyproto import build_dgram_header
from labelproxy.streams.udp.session import UdpSession
from labelproxy.streams.udp.sockets import (
    MAX_DATAGRAM,
    SockAddr,
    local_address_towards,
    open_upstream,
)
from labelproxy.streams.udp.wakequeue import UdpWake

logger = logging.getLogger(__name__)

#: Datagrams handled per readiness callback before yielding to the loop (fairness).
BATCH = 256
#: Datagrams kept per session while its backend's host name is being resolved.
PENDING_LIMIT = 32

Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]


class UdpRelay:
    """A route's listening socket and sessions; see the module docstring."""

    def __init__(
        self,
        live: LiveRoute,
        listener: socket.socket,
        *,
        loop: asyncio.AbstractEventLoop,
        spawn: Spawn,
    ) -> None:
        self.live = live
        self.listener = listener
        self.loop = loop
        self._spawn = spawn
        self.sessions: dict[SockAddr, UdpSession] = {}
        self._buf = bytearray(MAX_DATAGRAM + 1)
        self._view = memoryview(self._buf)
        name = listener.getsockname()
        self.bound: tuple[str, int] = (str(name[0]), int(name[1]))
        self._spec_seen = live.spec
        self._listen = str(live.spec.key)  # for the logs (an update keeps the listen key)
        self._listening = False
        self.admitting = True  # False once the route is closed: new sources are dropped
        self.drain = Drain(loop)
        self.resolving = 0  # tasks resolving a backend's name
        self._expiry: asyncio.Handle | None = None
        # sessions held while the route's container wakes (`wakequeue`); only with a waker
        waker = live.shared.waker
        self.wake = None if waker is None else UdpWake(self, waker)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.loop.add_reader(self.listener.fileno(), self._on_client_readable)
        self._listening = True
        self._expiry = self.loop.call_soon(self._expire_idle_sessions)
        if self.wake is not None:
            self.wake.start()

    def stop_listening(self) -> None:
        """Stop reading and close the listening socket: the port is free afterwards."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.wake is not None:
            self.wake.close()
        if self._listening:
            self._listening = False
            self.loop.remove_reader(self.listener.fileno())
        self.listener.close()

    def stop_admitting(self) -> int:
        """The route is closed: no new session from now on (the existing ones go on until
        they are idle or the drain ends); the sessions left."""
        self.admitting = False
        left = len(self.sessions)
        self.drain.begin(left)
        return left

    def close_all(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            self.close_session(session, reason)

    def _expire_idle_sessions(self) -> None:
        """Close sessions idle (both ways) for the route's idle_timeout, and those whose
        backend left the route; again and again on a loop timer until the listener stops
        (a timer, not a task: stopping it cancels nothing)."""
        delay = 1.0
        try:
            if self.live.spec is not self._spec_seen:
                self._adopt_spec()
            idle = self.live.idle_timeout
            if idle is None or idle <= 0:
                delay = 30.0
                return
            now = time.monotonic()
            earliest = now + idle
            for session in list(self.sessions.values()):
                if session.conn.backend is None:  # held for a wake: wake_timeout is its own
                    continue
                deadline = session.last_active + idle
                if deadline <= now:
                    self.close_session(session, "idle")
                elif deadline < earliest:
                    earliest = deadline
            delay = min(max(earliest - now, min(idle / 20, 1.0)), 30.0)
        finally:
            if self._listening:
                self._expiry = self.loop.call_later(delay, self._expire_idle_sessions)

    # -- sessions ------------------------------------------------------------------------
    def _adopt_spec(self) -> None:
        """The route's spec changed: end sessions whose backend left it (see udp.py)."""
        self._spec_seen = spec = self.live.spec
        current = set(spec.backends)
        for session in list(self.sessions.values()):  # (a session held for a wake has none)
            if session.conn.backend is not None and session.conn.backend not in current:
                self.close_session(session, "backend_gone")

    def _open_session(self, addr: SockAddr) -> UdpSession | None:
        live = self.live
        if not self.admitting:
            logger.debug("udp datagram from %s dropped: %s is closing", addr, live.spec.key)
            return None
        client = (unmapped(addr[0]), addr[1])
        conn = ConnInfo(
            route=live.spec.alias, transport="udp", client=client, peer=client, listen=self.bound
        )
        if live.admit(conn) is not None:
            logger.debug("udp datagram from %s refused on %s", client, live.spec.key)
            return None
        wake = self.wake
        if wake is not None and not wake.ready():  # its container sleeps: queue, wake it
            return wake.hold(conn, addr)
        backend = live.pick_backend(client[0])
        if backend is None:
            conn.close_reason = "no_backend"
            live.release(conn)
            live.counters.drop("no_backend")
            return None
        conn.backend = backend
        live.backend_opened(backend)
        header = None
        if live.spec.options.proxy_protocol == "v2":
            conn.listen = local_address_towards(client, self.bound)
            header = build_dgram_header(client, conn.listen)
        session = UdpSession(addr, conn, header)
        self.sessions[addr] = session
        log_opened(conn, listen=self._listen)
        if literal_family(backend.host) is not None:
            if self._refuse_loop(session, backend.host):
                return None
            try:
                self._attach(session, open_upstream(backend.host, backend.port))
            except OSError as exc:
                live.counters.drop("upstream_error")
                logger.debug("udp upstream %s unusable: %s", backend, exc)
                self.close_session(session, "upstream_error")
                return None
        else:
            session.pending = []
            self.resolving += 1
            self._spawn(lambda: self._resolve(session, backend))
        return session

    def _refuse_loop(self, session: UdpSession, host: str) -> bool:
        """True (the session closed, its datagrams dropped as `loop`) when the backend at
        `host` is one of labelproxy's own listeners: relaying there would loop."""
        backend = session.conn.backend
        own = self.live.shared.own
        if backend is None or backend.port not in own.udp:
            return False
        route = self.live.spec.alias
        if own.refuse("udp", host, backend.port, route=route, backend=backend) is None:
            return False
        if not session.closed:
            self.live.counters.drop("loop", max(1, len(session.pending or ())))
            self.close_session(session, "loop")
        return True

    def _attach(self, session: UdpSession, sock: socket.socket) -> None:
        session.sock = sock
        self.loop.add_reader(sock.fileno(), self._on_upstream_readable, session)

    async def _resolve(self, session: UdpSession, backend: Backend) -> None:
        """A task: connect `session` to `backend`, a host name, then send what waited."""
        try:
            await self._connect_by_name(session, backend)
        finally:
            self.resolving -= 1

    async def _connect_by_name(self, session: UdpSession, backend: Backend) -> None:
        try:
            infos = await anyio.getaddrinfo(backend.host, backend.port, type=socket.SOCK_DGRAM)
            host = str(infos[0][4][0])
            if self._refuse_loop(session, host):
                return
            sock = open_upstream(host, backend.port)
        except OSError as exc:
            if not session.closed:
                self.live.counters.drop("upstream_error", max(1, len(session.pending or ())))
                logger.error("udp upstream %s: cannot resolve or connect: %s", backend, exc)
                self.close_session(session, "upstream_error")
            return
        if session.closed:
            sock.close()
            return
        self._attach(session, sock)
        pending, session.pending = session.pending or [], None
        for payload in pending:
            self._send_upstream(session, sock, memoryview(payload))

    def _send_upstream(self, session: UdpSession, sock: socket.socket, data: memoryview) -> None:
        counters = self.live.counters
        try:
            if session.header is None:
                sock.send(data)
            else:
                sock.sendmsg((session.header, data))
        except OSError:
            counters.drop("upstream_error")
            return
        n = len(data)
        counters.udp_datagrams_in += 1
        counters.bytes_in += n
        session.conn.bytes_in += n
        for hook in self.live.policy.chunk:
            hook.on_chunk(session.conn, "in", n)

    def close_session(self, session: UdpSession, reason: str) -> None:
        """End `session` once: unregister, close its socket, release, access-log."""
        if session.closed:
            return
        session.closed = True
        if self.sessions.get(session.addr) is session:
            del self.sessions[session.addr]
        if self.wake is not None and session.conn.backend is None:
            self.wake.forget(session)
        if session.sock is not None:
            self.loop.remove_reader(session.sock.fileno())
            session.sock.close()
        conn = session.conn
        conn.close_reason = reason
        self.live.release(conn)
        log_closed(conn, listen=self._listen)
        self.drain.settled(len(self.sessions))

    # -- hot path ------------------------------------------------------------------------
    #: Datagrams a wake-up reads one at a time before `_client_batches` / `_upstream_batches`
    #: take what is queued behind them (this relay has no batches: it reads them all so).
    PLAIN_READS = BATCH

    def _on_client_readable(self) -> None:
        recvfrom_into = self.listener.recvfrom_into
        buf, view = self._buf, self._view
        counters = self.live.counters
        if self.live.spec is not self._spec_seen:
            self._adopt_spec()
        chunk_hooks = self.live.policy.chunk
        now = time.monotonic()
        count = nbytes = errors = 0
        rearm = False
        try:
            for _ in range(self.PLAIN_READS):
                try:
                    n, addr = recvfrom_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:  # never fatal; see _rearm
                    logger.debug("udp listener %s: %s", self.live.spec.key, exc)
                    rearm = True
                    break
                sent = self._from_client(view[:n], addr, now, chunk_hooks)
                if sent:
                    count += 1
                    nbytes += n
                elif sent is None:
                    errors += 1
            else:  # every plain read found a datagram: more may be queued
                c, b, e, rearm = self._client_batches(now, chunk_hooks)
                count, nbytes, errors = count + c, nbytes + b, errors + e
        finally:
            counters.udp_datagrams_in += count
            counters.bytes_in += nbytes
            if errors:
                counters.drop("upstream_error", errors)
            if rearm and self._listening:
                self.loop.remove_reader(self.listener.fileno())
                self.loop.add_reader(self.listener.fileno(), self._on_client_readable)

    def _client_batches(self, now: float, hooks: tuple[Hook, ...]) -> tuple[int, int, int, bool]:
        """Move what is queued on the listening socket in batches: (sent, bytes, lost,
        re-arm). The per-datagram relay has none; its next wake-up reads on."""
        return 0, 0, 0, False

    def _from_client(
        self, data: memoryview, addr: SockAddr, now: float, chunk_hooks: tuple[Hook, ...]
    ) -> bool | None:
        """Forward one datagram from `addr`: True sent; False refused or kept until the
        backend's name resolves (counted by the hooks); None lost (an `upstream_error`)."""
        session = self.sessions.get(addr)
        if session is None:
            session = self._open_session(addr)
            if session is None:
                return False
        session.last_active = now
        sock = session.sock
        if sock is None:
            wake = self.wake
            if wake is not None and session in wake.held:
                return wake.queue(session, data)
            if session.pending is not None and len(session.pending) < PENDING_LIMIT:
                session.pending.append(bytes(data))
                return False
            return None
        try:
            if session.header is None:
                sock.send(data)
            else:
                sock.sendmsg((session.header, data))
        except OSError:  # refused (ICMP), buffer full, too large with the header
            return None
        n = len(data)
        session.conn.bytes_in += n
        for hook in chunk_hooks:
            hook.on_chunk(session.conn, "in", n)
        return True

    def _on_upstream_readable(self, session: UdpSession) -> None:
        sock = session.sock
        if sock is None or session.closed:
            return
        recv_into = sock.recv_into
        sendto = self.listener.sendto
        buf, view, client = self._buf, self._view, session.addr
        conn = session.conn
        chunk_hooks = self.live.policy.chunk
        count = nbytes = errors = dropped = 0
        try:
            for _ in range(self.PLAIN_READS):
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:  # ICMP port unreachable from the backend
                    errors += 1
                    continue
                except OSError as exc:
                    errors += 1
                    logger.debug("udp upstream %s: %s", conn.backend, exc)
                    break
                try:
                    sendto(view[:n], client)
                except OSError:  # the client's side is full or gone: the datagram is lost
                    dropped += 1
                    continue
                count += 1
                nbytes += n
                for hook in chunk_hooks:
                    hook.on_chunk(conn, "out", n)
            else:  # every plain read found a datagram: more may be queued
                c, b, e, d = self._upstream_batches(session, sock, chunk_hooks)
                count, nbytes, errors, dropped = count + c, nbytes + b, errors + e, dropped + d
        finally:
            self._settle_upstream_read(
                session, sock, count=count, nbytes=nbytes, errors=errors, dropped=dropped
            )

    def _upstream_batches(
        self, session: UdpSession, sock: socket.socket, hooks: tuple[Hook, ...]
    ) -> tuple[int, int, int, int]:
        """Move the replies queued on `session`'s upstream socket in batches: (sent, bytes,
        errors, dropped). The per-datagram relay has none."""
        return 0, 0, 0, 0

    def _settle_upstream_read(
        self,
        session: UdpSession,
        sock: socket.socket,
        *,
        count: int,
        nbytes: int,
        errors: int,
        dropped: int,
    ) -> None:
        """Account one upstream wake-up (per batch, not per datagram) and re-arm if needed."""
        counters = self.live.counters
        if count:
            session.last_active = time.monotonic()
            counters.udp_datagrams_out += count
            counters.bytes_out += nbytes
            session.conn.bytes_out += nbytes
        if errors:
            counters.drop("upstream_error", errors)
        if errors or not (count or dropped):
            # an error, or woken with nothing to read (its error was taken by a send)
            self._rearm(session, sock)

    def _rearm(self, session: UdpSession, sock: socket.socket) -> None:
        """Register the reader again after a socket error: libuv (uvloop) stops a poll
        handle that reported POLLERR (after one last callback), which would silence the
        session for good. Costs two epoll_ctl calls, only on errors or empty wake-ups."""
        if not session.closed and session.sock is sock:
            self.loop.remove_reader(sock.fileno())
            self.loop.add_reader(sock.fileno(), self._on_upstream_readable, session)
