"""UDP clients of a sleeping container: their datagrams queue while it wakes, then go in order.

For a route whose options carry a `spec.Sleep`, `UdpWake` (made by `relay.UdpRelay` when the
process has a `wakeup.Waker`) takes the first datagram of a new client while the container is
not awake, or has no ready backend: the client is admitted as usual (ACL, caps: a denied
client wakes nothing), its session is opened with no backend yet, and the waker is asked to
start the container. Its datagrams are queued, bounded per client (`CLIENT_DATAGRAMS`,
`CLIENT_BYTES`) and per route (`ROUTE_DATAGRAMS`, `ROUTE_BYTES`); the overflow is dropped and
counted (`limit`). Once the container is awake and a backend ready, each held session gets
its backend and upstream socket, and its queue is sent in arrival order. At `wake_timeout`
(or at once when the wake failed) the held sessions are closed (`wake_timeout`) and what they
queued is counted lost (`no_backend`).

It works the relay's own session table (`_attach`, `_send_upstream`, `_resolve`, `_spawn`):
a held session becomes an ordinary one. Nothing here blocks: the datagrams of other clients
whose sessions already exist, and of every other route, go on as before while one container
wakes. Everything runs on the asyncio loop, except `_changed` (any thread: to the loop).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import anyio

from labelproxy.spec import Backend
from labelproxy.streams.addresses import literal_family
from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.udp.session import UdpSession
from labelproxy.streams.udp.sockets import SockAddr, open_upstream
from labelproxy.streams.wakeup import Waker

logger = logging.getLogger(__name__)

CLIENT_DATAGRAMS = 64
CLIENT_BYTES = 256 * 1024
ROUTE_DATAGRAMS = 4096
ROUTE_BYTES = 4 * 1024 * 1024


class UdpRelay(Protocol):
    """What this module uses of `relay.UdpRelay` (which makes the `UdpWake`; a protocol, so
    that the two modules do not import each other)."""

    live: LiveRoute
    loop: asyncio.AbstractEventLoop
    sessions: dict[SockAddr, UdpSession]
    resolving: int

    def _spawn(self, factory: Callable[[], Coroutine[Any, Any, None]]) -> None: ...

    def _attach(self, session: UdpSession, sock: socket.socket) -> None: ...

    def _send_upstream(
        self, session: UdpSession, sock: socket.socket, data: memoryview
    ) -> None: ...

    async def _resolve(self, session: UdpSession, backend: Backend) -> None: ...

    def _refuse_loop(self, session: UdpSession, host: str) -> bool: ...

    def close_session(self, session: UdpSession, reason: str) -> None: ...


class UdpWake:
    """The held sessions of one UDP route while its container wakes (see the module doc)."""

    def __init__(self, relay: UdpRelay, waker: Waker) -> None:
        self._relay = relay
        self._waker = waker
        self._loop: asyncio.AbstractEventLoop = relay.loop
        self.held: dict[UdpSession, int] = {}  # session -> bytes it queued
        self._bytes = 0
        self._datagrams = 0
        self._changed_event = anyio.Event()
        self._waiting = False
        self._undo: list[Callable[[], None]] = []

    def start(self) -> None:
        live = self._relay.live
        self._undo.append(self._waker.subscribe(self._changed))
        health = live.shared.health
        if health is not None:
            self._undo.append(health.subscribe(self._changed))
        live.updated.append(self._changed)

    def close(self) -> None:
        for undo in self._undo:
            undo()
        self._undo.clear()

    def ready(self) -> bool:
        """True when a new client may go straight to a backend (no sleep, or awake and
        ready)."""
        live = self._relay.live
        sleep = live.spec.options.sleep
        if sleep is None:
            return True
        return self._waker.awake(sleep.container_id) and bool(live.ready_backends())

    def hold(self, conn: ConnInfo, addr: SockAddr) -> UdpSession:
        """Open `conn`'s session with no backend and queue its datagrams until ready."""
        relay = self._relay
        session = UdpSession(addr, conn, None)
        session.pending = []
        relay.sessions[addr] = session
        self.held[session] = 0
        self._waker.held(conn.route, str(relay.live.spec.key), 1)
        sleep = relay.live.spec.options.sleep
        if sleep is not None:
            self._waker.request(sleep, route=conn.route, listen=str(relay.live.spec.key))
        if not self._waiting:
            self._waiting = True
            relay._spawn(self._wait)
        return session

    def queue(self, session: UdpSession, data: bytes | memoryview) -> bool | None:
        """Keep one datagram of a held session (False: kept or dropped, counted here)."""
        pending = session.pending
        n = len(data)
        queued = self.held.get(session)
        if pending is None or queued is None:
            return None
        if (
            len(pending) >= CLIENT_DATAGRAMS
            or queued + n > CLIENT_BYTES
            or self._datagrams >= ROUTE_DATAGRAMS
            or self._bytes + n > ROUTE_BYTES
        ):
            self._relay.live.counters.drop("limit")
            return False
        pending.append(bytes(data))
        self.held[session] = queued + n
        self._datagrams += 1
        self._bytes += n
        return False

    def _changed(self, *_: object) -> None:
        """(any thread) The waker, the health checker or a spec update: look again."""
        self._loop.call_soon_threadsafe(self._changed_event.set)

    async def _wait(self) -> None:
        """A task: until the held sessions are sent on, or closed at the wake timeout."""
        began = time.monotonic()  # the clients held from now on wait for this wake
        try:
            while self.held:
                sleep = self._relay.live.spec.options.sleep
                timeout = sleep.wake_timeout if sleep is not None else 0.0
                left = began + timeout - time.monotonic()
                failed = "" if sleep is None else self._waker.failed(sleep.container_id)
                if self.ready():
                    self._release_all()
                elif failed or left <= 0:
                    self._close_all(failed or f"not ready within wake_timeout {timeout:g}s")
                else:
                    with anyio.move_on_after(min(left, 1.0)):
                        await self._changed_event.wait()
                    self._changed_event = anyio.Event()
        finally:
            self._waiting = False

    def _forget(self, session: UdpSession) -> int:
        queued = self.held.pop(session, 0)
        self._bytes -= queued
        self._datagrams -= len(session.pending or ())
        relay = self._relay
        self._waker.held(session.conn.route, str(relay.live.spec.key), -1)
        return queued

    def _release_all(self) -> None:
        relay = self._relay
        live = relay.live
        for session in list(self.held):
            self._forget(session)
            if session.closed:
                continue
            backend = live.pick_backend(session.conn.client[0])
            if backend is None:  # gone again meanwhile: what it queued is lost
                live.counters.drop("no_backend", max(1, len(session.pending or ())))
                relay.close_session(session, "no_backend")
                continue
            session.conn.backend = backend
            live.backend_opened(backend)
            if literal_family(backend.host) is None:  # a name: resolved, then sent
                relay.resolving += 1
                relay._spawn(functools.partial(relay._resolve, session, backend))
                continue
            if relay._refuse_loop(session, backend.host):
                continue
            try:
                sock = open_upstream(backend.host, backend.port)
            except OSError as exc:
                live.counters.drop("upstream_error", max(1, len(session.pending or ())))
                logger.debug("udp upstream %s unusable: %s", backend, exc)
                relay.close_session(session, "upstream_error")
                continue
            relay._attach(session, sock)
            pending, session.pending = session.pending or [], None
            for payload in pending:
                relay._send_upstream(session, sock, memoryview(payload))
            session.last_active = time.monotonic()

    def _close_all(self, why: str) -> None:
        relay = self._relay
        for session in list(self.held):
            self._forget(session)
            if session.closed:
                continue
            lost = len(session.pending or ())
            if lost:
                relay.live.counters.drop("no_backend", lost)
            logger.info(
                "route %s: closed held udp client %s: %s", session.conn.route,
                session.conn.client[0], why,
                extra={"route": session.conn.route, "listen": str(relay.live.spec.key),
                       "action": "wake_timeout"},
            )  # fmt: skip
            relay.close_session(session, "wake_timeout")

    def forget(self, session: UdpSession) -> None:
        """`session` closed (idle, drain) while held."""
        if session in self.held:
            self._forget(session)
