"""The TCP listener of one route: bind, accept, admit, dial, relay, drain.

`serve_tcp(live)` binds `live.spec.key` (raising OSError before "started" when it cannot)
on the caller's asyncio loop, then hands the listener to the TCP data loop (`loop`: its own
thread and epoll), where a connection is a chain of callbacks, with no task and no asyncio
handle per connection:

    Acceptor (accept)  ->  TcpServer._accepted  ->  open: LiveRoute.admit (ACL, caps)
      ->  Connector (dial: steps, backend pick, connect with failover)
      ->  Relay (relay + pump: bytes both ways)  ->  TcpServer.ended: LiveRoute.release,
          access log, drain

Where a coroutine is simpler, a short setup task on the asyncio loop does the waiting part
(`setup`): a trusted proxy's PROXY header is read first, or host-name backends are
resolved; the client then comes back to the data loop (`open`), which admits and dials it
like any other. An idle connection costs two socket fds, a few small objects and two epoll
entries. It needs epoll and eventfd (Linux); elsewhere `serve_tcp` raises OSError, like a
bind failure.

On `live.close()` the listening socket closes at once (`live.listener_closed`), then the
one drain (`drain.Drain`) lets live connections end within `live.drain_timeout`; the rest
are closed (`drain_timeout`) and `live.finished` is set. Cancelled from outside, everything
closes promptly and the events are set too.

Threads: `TcpServer` implements `owner.Owner` for its connections. Its methods marked
"(data loop)" run on the data loop's thread and are the only ones that touch connections,
`conns` or `setups`; `run` and the setup tasks run on the asyncio loop and reach the data
loop through `DataLoop.submit` / `DataLoop.call`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Protocol, Self

import anyio
import anyio.abc

import labelproxy.streams.tcp.loop as data_loop
from labelproxy.spec import Backend, ListenKey, RouteSpec
from labelproxy.streams.accesslog import log_closed, log_opened
from labelproxy.streams.accesslog import logger as open_log
from labelproxy.streams.drain import Drain
from labelproxy.streams.hooks import ConnInfo
from labelproxy.streams.live import LiveRoute, ProxyHeader
from labelproxy.streams.proxyproto import build_header
from labelproxy.streams.sockets import bind_socket, bound_address, set_nodelay
from labelproxy.streams.tcp.accept import Acceptor
from labelproxy.streams.tcp.deadlines import Deadlines
from labelproxy.streams.tcp.dial import Address, Connector, Step, literal_addresses
from labelproxy.streams.tcp.hold import Hold
from labelproxy.streams.tcp.owner import Owned
from labelproxy.streams.tcp.setup import Found, HeaderRefusedError, set_up
from labelproxy.streams.tcp.splice import PipePool, splice_supported
from labelproxy.streams.tcp.wakehold import WakeHold

logger = logging.getLogger(__name__)

_SetupJob = tuple[int, tuple[str, int], tuple[str, int], ProxyHeader | None]


class Door(Protocol):
    """(data loop) Where a listener's clients come from: its `accept.Acceptor`, or its
    entry in a shared listener's name table. `start` opens it, `close` shuts it for good."""

    def start(self) -> None: ...

    def close(self) -> None: ...


async def serve_tcp(
    live: LiveRoute,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    zero_copy: bool | None = None,
) -> None:
    """Serve `live`'s TCP listener until it is closed and drained (or this task is cancelled).

    `zero_copy`: None splices bulk transfers where the platform can; False only copies.
    """
    if not data_loop.available():
        raise OSError("the TCP relay needs epoll and eventfd (Linux)")
    sock = bind_socket(live.spec.key, live.spec.family)
    set_nodelay(sock)  # accepted sockets inherit TCP_NODELAY (Linux): no syscall each
    use_splice = splice_supported() if zero_copy is None else zero_copy
    try:
        server = TcpServer(live, sock, zero_copy=use_splice)
    except BaseException:
        sock.close()
        raise
    bound = bound_address(sock)
    own = ListenKey("tcp", live.spec.key.bind, bound[1])
    live.shared.own.add(own, live.spec.family)
    try:
        live.bound = [bound]
        await server.run(task_status)
    finally:
        live.shared.own.remove(own, live.spec.family)
        with anyio.CancelScope(shield=True):
            await server.loop.call(server.shutdown)
        live.stopped_admitting.set()
        live.listener_closed.set()
        live.finished.set()


class TcpServer:
    """The listening socket of one route, its connections in setup, dialing or relaying,
    and its drain; the `owner.Owner` of those connections."""

    def __init__(
        self,
        live: LiveRoute,
        sock: socket.socket,
        *,
        zero_copy: bool,
        door: Callable[[Self], Door] | None = None,
    ) -> None:
        """Made on the asyncio loop, for the process's data loop (`loop.shared`). `door`:
        where its clients come from when it does not accept on `sock` itself (a route
        chosen by name: its entry in the shared listener's table, `names.Member`; the
        server is then a `named.NamedServer`)."""
        aloop = asyncio.get_running_loop()
        loop = self.loop = data_loop.shared()
        self.live = live
        self.pool = PipePool() if zero_copy else None
        self.deadlines = Deadlines(loop)
        self.acceptor: Door = door(self) if door is not None else Acceptor(
            loop,
            sock,
            self._accepted,
            name=f"route {live.spec.alias} on {live.spec.key}",
            learn_local=live.shared.own.learn,
        )
        self.drain = Drain(aloop)
        self.conns: set[Owned] = set()  # (data loop) dialing or relaying
        self.setups = 0  # (data loop) clients out in a setup task
        self.closed = False  # (data loop) shut down: nothing new is admitted
        self._family = sock.family
        self._listen = str(live.spec.key)  # for the logs (an update keeps the listen key)
        self._aloop = aloop
        self._tg: anyio.abc.TaskGroup | None = None  # (asyncio) of the setup tasks
        self._setup_tasks = 0  # (asyncio) setup tasks running
        self._spec_seen: RouteSpec | None = None  # (data loop) what the two below are for
        self._addrs: dict[Backend, Address] | None = None
        self._steps: tuple[Step, ...] = ()
        # (data loop) clients waiting for a ready backend; only with a health checker
        self.hold = (
            Hold(loop, self.deadlines, live.spec.key) if live.shared.health is not None else None
        )
        if self.hold is not None:
            live.updated.append(functools.partial(loop.submit, self.hold.wake))
        # (data loop) clients held while the route's container wakes; only with a waker
        waker = live.shared.waker
        self.wake = None if waker is None else WakeHold(loop, self.deadlines, live.spec.key, waker)
        if self.wake is not None:
            live.updated.append(self.wake.recheck)

    @property
    def active(self) -> int:
        """(data loop) Connections not over yet, in setup or not."""
        return self.setups + len(self.conns)

    # -- the listener's life (asyncio) -----------------------------------------------------
    async def run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        live = self.live
        health, hold = live.shared.health, self.hold
        unsubscribe = []
        if health is not None and hold is not None:
            unsubscribe.append(health.subscribe(hold.on_change))
        waker, wake = live.shared.waker, self.wake
        if waker is not None and wake is not None:
            unsubscribe.append(waker.subscribe(wake.recheck))
            if health is not None:
                unsubscribe.append(health.subscribe(wake.recheck))
        try:
            await self._run(task_status)
        finally:
            for undo in unsubscribe:
                undo()

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        live = self.live
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self.loop.call(self.acceptor.start)
                logger.debug("route %s: listening on %s", live.spec.alias, live.spec.key)
                task_status.started()
                await live.closing.wait()
                left = await self.loop.call(self._stop_admitting)
                live.stopped_admitting.set()
                live.listener_closed.set()
                await self.drain.wait(live, left, what="connections")
                self._tg = None  # no new setup task from now on
                if self._setup_tasks:  # only then: a drain that ends cancels nothing
                    tg.cancel_scope.cancel()
        finally:
            self._tg = None
        await self.loop.call(self._abort_all, "drain_timeout")

    def _start_setup(self, job: _SetupJob) -> None:
        """(asyncio) Start a setup task for a client the data loop handed over."""
        client, peer, listen, mode = job
        sock = socket.socket(self._family, socket.SOCK_STREAM, 0, client)
        if self._tg is None:  # the listener is stopping
            sock.close()
            self.loop.submit(self._set_up_done, -1, peer, None, False, False)
            return
        self._setup_tasks += 1
        self._tg.start_soon(self._set_up, sock, peer, listen, mode)

    async def _set_up(
        self,
        client: socket.socket,
        peer: tuple[str, int],
        listen: tuple[str, int],
        mode: ProxyHeader | None,
    ) -> None:
        """A setup task: wait for what `setup.set_up` waits for, then hand the client back
        to the data loop (`_set_up_done`), whatever happened."""
        found: Found | None = None
        refused = False
        try:
            found = await set_up(self.live, client, peer, listen, read_header=mode == "read")
        except HeaderRefusedError as exc:
            refused = True
            logger.info("route %s: refused client %s: %s", self.live.spec.alias, peer[0], exc)
        except Exception:
            logger.exception("route %s: connection setup failed", self.live.spec.alias)
        finally:
            self._setup_tasks -= 1
            fd = -1
            if found is None:
                client.close()
            else:
                fd = client.detach()
            self.loop.submit(self._set_up_done, fd, peer, found, mode == "sniff", refused)

    # -- the listener's life (data loop) ---------------------------------------------------
    def _stop_admitting(self) -> int:
        """(data loop) Close the listening socket and start draining; the connections left."""
        self.acceptor.close()
        left = self.active
        self.drain.begin(left)
        return left

    def shutdown(self) -> None:
        """(data loop) Close the listener and every connection; idempotent."""
        self.closed = True
        self.acceptor.close()
        self._abort_all("shutdown")
        self.deadlines.close()
        if self.pool is not None:
            self.pool.close()

    def _abort_all(self, reason: str) -> None:
        for conn in list(self.conns):
            conn.abort(reason)

    # -- one connection (data loop) --------------------------------------------------------
    def _accepted(self, client: int, peer: tuple[str, int], listen: tuple[str, int]) -> None:
        """(data loop) A new client (a non-blocking fd this takes over) from the acceptor."""
        live = self.live
        # a trusted PROXY sender or not: decided here, once (skipped when headers are off)
        mode = live.proxy_header(peer[0]) if live.accepts_proxy_headers else None
        spec = live.spec
        if spec is not self._spec_seen:
            self._adopt(spec)
        addrs = self._addrs
        if addrs is None or mode == "read":  # a header to read, names to resolve: a task
            self.setups += 1
            self._aloop.call_soon_threadsafe(self._start_setup, (client, peer, listen, mode))
            return
        self.open(client, peer, peer, listen, rest=b"", sniff=mode == "sniff", addrs=addrs)

    def _set_up_done(
        self, client: int, peer: tuple[str, int], found: Found | None, sniff: bool, refused: bool
    ) -> None:
        """(data loop) A setup task ended: open its client, or count its refusal."""
        self.setups -= 1
        if found is not None:
            self.open(
                client, found.source, peer, found.dest, rest=found.rest, sniff=sniff,
                addrs=found.addrs,
            )  # fmt: skip
        elif refused:
            self.live.refused("proxy_header")
        self._settled()

    def open(
        self,
        client: int,
        source: tuple[str, int],
        peer: tuple[str, int],
        dest: tuple[str, int],
        *,
        rest: bytes,
        sniff: bool,
        addrs: Mapping[Backend, Address | None],
        name: str = "",
    ) -> None:
        """(data loop) Admit a client (a non-blocking socket fd this takes over) whose
        addresses are known (`source`/`dest` from its PROXY header, else the socket's) and
        dial its backend: `addrs` holds each backend's address (None: did not resolve);
        `rest` is client data already read; `name` the one it asked for (a shared
        listener's)."""
        live = self.live
        if self.closed:
            os.close(client)
            return
        conn = ConnInfo(live.spec.alias, "tcp", source, peer, dest)
        if name:
            conn.name = name
        reason = live.admit(conn)
        if reason is not None:
            logger.debug("route %s: refused client %s (%s)", conn.route, source[0], reason)
            os.close(client)
            return
        version = live.spec.options.proxy_protocol
        prefix = build_header(version, source, dest) + rest if version is not None else rest
        connector = Connector(
            self, client, conn, addrs, prefix=prefix, sniff=sniff, read=bool(rest),
            steps=self._steps,
        )  # fmt: skip
        self.conns.add(connector)
        connector.proceed()

    def _adopt(self, spec: RouteSpec) -> None:
        """(data loop) The route's spec changed: its backends' addresses (None: names to
        resolve) and the steps of its new connections."""
        self._spec_seen = spec
        self._addrs = literal_addresses(spec.backends)
        self._steps = self._steps_of(spec)

    def _steps_of(self, spec: RouteSpec) -> tuple[Step, ...]:
        """The steps a new connection of `spec` takes before its backend is picked
        (`dial.Step`): the hold for a ready backend (`hold.Hold`) when the process checks
        health, after the hold while its container wakes (`wakehold.WakeHold`) for a
        sleep-enabled route. A peek (ClientHello) is listed here too."""
        steps: tuple[Step, ...] = () if self.hold is None else (self.hold.step,)
        if self.wake is not None and spec.options.sleep is not None:
            steps = (self.wake.step, *steps)
        return steps

    # -- what the connections tell (owner.Owner, data loop) ----------------------------------
    def handed_over(self, old: Owned, new: Owned) -> None:
        self.conns.discard(old)
        self.conns.add(new)
        if open_log.isEnabledFor(logging.DEBUG):
            log_opened(new.conn, listen=self._listen)

    def ended(self, owned: Owned) -> None:
        self.conns.discard(owned)
        if self.hold is not None:
            self.hold.forget(owned)
        if self.wake is not None:
            self.wake.forget(owned)
        conn = owned.conn
        self.live.release(conn)
        log_closed(conn, listen=self._listen)
        drain = self.drain  # _settled, inline: once per connection
        if drain.draining:
            drain.settled(self.active)

    def _settled(self) -> None:
        drain = self.drain
        if drain.draining:
            drain.settled(self.active)
