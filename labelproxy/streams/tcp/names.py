"""A TCP listener shared by routes chosen by name (`hostnames`): peek, then hand over.

Routes whose listen keys differ only by their names (`ListenKey.names`: same transport,
bind and port) share one listening socket, a `NameGroup`. Each such route is served by
its own `named.NamedServer`, a `server.TcpServer` (its `LiveRoute`, caps, counters,
health, dials, relays, drain and access log, as if it had a port of its own) that does not
accept: its door (`server.Door`) is a `Member`, its entry in the group's `NameTable`.
`serve_named(live)` is the route's engine (`live.Serve`): it joins the group of its socket
key, binding the socket when it is the first (an OSError before "started", as any bind failure), and
leaves it when the route closes; the last member out closes the socket.

A connection on the data loop (no task, no thread of its own):

    Acceptor -> NameGroup._accepted: the global ACL (and the routes' own rules where they
        all agree), before anything is read; else refused, reason `acl`; the global cap
        (`LABELPROXY_MAX_CONNECTIONS`, counting the clients being read here), `limit`
      -> _Peek: the client fd watched for its first bytes, up to `PEEK_LIMIT` (16 KiB) and
         `edge.peek_timeout` (one `Deadlines` timer for all), a trusted proxy's PROXY
         header first (`reader.NameReader`); other clients are not held up meanwhile
      -> the name (TLS SNI or Minecraft server address) looked up in the table
      -> NamedServer.hand: the chosen route's ACL, caps, backend, PROXY header, dial; the
         bytes read are relayed first and unchanged, the rest as usual (zero-copy bulk)

The group's own refusals (before a route is chosen) are counted on its own series
(`shared.listener_counters`, i.e. `Metrics.listener`): `acl`, `limit`, `proxy_header` (a trusted
proxy's bad header), `no_route` (no name matches and there is no `*`), `peek_timeout` and
`peek_invalid` (bytes that are no ClientHello or handshake, or 16 KiB without one). A
client that closes before sending anything is not counted.

Threads: `serve_named` and the registry of groups live on the asyncio loop; everything a
group does with sockets, its table and its peeks runs on the data loop.
"""

from __future__ import annotations

import logging
import os
import socket
import weakref

import anyio
import anyio.abc

import labelproxy.streams.tcp.loop as data_loop
from labelproxy.metrics import NameRejectReason, RouteCounters
from labelproxy.spec import Family, ListenKey
from labelproxy.streams.acl import Acl, LayeredAcl
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.names.hello import PeekError
from labelproxy.streams.names.reader import PEEK_LIMIT, HeaderRefusedError, NameReader, Peeked
from labelproxy.streams.names.table import NameTable
from labelproxy.streams.shared import SharedState
from labelproxy.streams.sockets import bind_socket, bound_address, set_nodelay
from labelproxy.streams.tcp.accept import Acceptor
from labelproxy.streams.tcp.deadlines import Deadlines
from labelproxy.streams.tcp.loop import EPOLLIN, DataLoop
from labelproxy.streams.tcp.named import NamedServer
from labelproxy.streams.tcp.splice import splice_supported

logger = logging.getLogger(__name__)

Address = tuple[str, int]
# the groups of each process's shared state, by socket key (asyncio loop only)
_GROUPS: weakref.WeakKeyDictionary[SharedState, dict[ListenKey, NameGroup]] = (
    weakref.WeakKeyDictionary()
)


async def serve_named(
    live: LiveRoute,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    zero_copy: bool | None = None,
) -> None:
    """Serve a route chosen by name on its shared listener until it is closed and drained
    (the `live.Serve` of routes with `hostnames`)."""
    if not data_loop.available():
        raise OSError("the TCP relay needs epoll and eventfd (Linux)")
    spec = live.spec
    key = spec.key.socket_key
    groups = _GROUPS.setdefault(live.shared, {})
    group = groups.get(key)
    if group is None or group.closed:
        group = NameGroup.bind(key, spec.family, live.shared, peek_timeout=live.edge.peek_timeout)
        groups[key] = group
    use_splice = splice_supported() if zero_copy is None else zero_copy
    server = NamedServer(live, group.sock, zero_copy=use_splice,
                       door=lambda s: Member(group, s))  # fmt: skip
    live.updated.append(lambda: server.loop.submit(group.rebuild))
    try:
        live.bound = [group.bound]
        await server.run(task_status)
    finally:
        with anyio.CancelScope(shield=True):
            await server.loop.call(server.shutdown)
        if group.closed:  # the last member left: a new group may hold the port already
            current = groups.get(key)
            group.release(forget=current is None or current is group)
            if current is group:
                del groups[key]
        live.stopped_admitting.set()
        live.listener_closed.set()
        live.finished.set()


class Member:
    """(data loop) A route's entry in its group's table: the `server.Door` of its server."""

    __slots__ = ("group", "server")

    def __init__(self, group: NameGroup, server: NamedServer) -> None:
        self.group = group
        self.server = server

    def start(self) -> None:
        self.group.join(self.server)

    def close(self) -> None:
        self.group.leave(self.server)


class _Peek:
    """(data loop) A client whose first bytes are being read."""

    __slots__ = ("fd", "group", "listen", "peer", "reader", "watched")

    def __init__(self, group: NameGroup, fd: int, peer: Address, listen: Address,
                 reader: NameReader) -> None:  # fmt: skip
        self.group = group
        self.fd = fd
        self.peer = peer
        self.listen = listen
        self.reader = reader
        self.watched = False  # on the loop and its deadline (not when read at once)

    def on_event(self, fd: int, events: int) -> None:
        self.group.readable(self)

    def timed_out(self) -> None:
        self.group.reject(self, "peek_timeout",
                          f"no name within {self.group.peek_timeout:g}s")  # fmt: skip

    def abort(self, reason: str) -> None:
        self.group.drop(self)


class NameGroup:
    """One listening socket shared by routes chosen by name; see the module docstring."""

    def __init__(self, key: ListenKey, sock: socket.socket, shared: SharedState, *,
                 family: Family, peek_timeout: float) -> None:  # fmt: skip
        self.key = key
        self.sock = sock
        self.family = family
        self.shared = shared
        self.peek_timeout = peek_timeout
        self.bound = bound_address(sock)
        self.own = ListenKey("tcp", key.bind, self.bound[1])
        self.counters: RouteCounters = shared.listener_counters(key)
        self.loop: DataLoop = data_loop.shared()
        self.deadlines = Deadlines(self.loop)
        self.acceptor = Acceptor(self.loop, sock, self._accepted,
                                 name=f"shared listener {key}",
                                 learn_local=shared.own.learn)  # fmt: skip
        self.members: list[NamedServer] = []  # (data loop) in the order they joined
        self.table: NameTable[NamedServer] = NameTable({})
        self.acl: Acl | LayeredAcl | None = None  # None: every client passes
        self.peeks: set[_Peek] = set()
        self.closed = False  # (data loop) the last member left: the socket is closed
        self._released = False

    @classmethod
    def bind(cls, key: ListenKey, family: Family, shared: SharedState, *,
             peek_timeout: float) -> NameGroup:  # fmt: skip
        """Bind `key` (OSError when it cannot) and make its group (asyncio loop)."""
        sock = bind_socket(key, family)
        set_nodelay(sock)
        try:
            group = cls(key, sock, shared, family=family, peek_timeout=peek_timeout)
        except BaseException:
            sock.close()
            raise
        shared.own.add(group.own, family)
        return group

    def release(self, *, forget: bool) -> None:
        """(asyncio) The group is closed: drop its own-listener entry and, unless a new
        group on the same key goes on counting in them (`forget` False), its series."""
        if not self._released:
            self._released = True
            self.shared.own.remove(self.own, self.family)
            if forget:
                self.shared.forget_listener(self.key)

    # -- members (data loop) ---------------------------------------------------------------
    def join(self, server: NamedServer) -> None:
        if self.closed:  # raced with the last member leaving: a bind problem, retried
            raise OSError(f"the shared listener {self.key} closed as route "
                          f"{server.live.spec.alias} joined it")  # fmt: skip
        self.members.append(server)
        self.rebuild()
        self.acceptor.start()

    def leave(self, server: NamedServer) -> None:
        if server not in self.members:
            return
        self.members.remove(server)
        if self.members:
            self.rebuild()
            return
        self.closed = True
        self.acceptor.close()
        self.table = NameTable({})
        for peek in list(self.peeks):
            self.drop(peek)
        self.deadlines.close()

    def rebuild(self) -> None:
        """The table and the shared ACL from the members' specs (a join, a leave, an
        update): first come first served on a name (the desired state has no repeats)."""
        entries: dict[str, NamedServer] = {}
        for server in self.members:
            for name in server.live.spec.key.names:
                entries.setdefault(name, server)
        self.table = NameTable(entries)
        if not self.members:
            return
        first = self.members[0].live
        rules = {(s.live.spec.options.allow, s.live.spec.options.deny) for s in self.members}
        layers = [first.global_acl]
        if len(rules) == 1:  # every route has the same rules: apply them before reading
            allow, deny = next(iter(rules))
            layers.append(Acl(allow, deny))
        acl = LayeredAcl(*layers)
        self.acl = None if acl.permits_all else acl

    # -- one client (data loop) ------------------------------------------------------------
    def _accepted(self, client: int, peer: Address, listen: Address) -> None:
        if self.closed or not self.members:
            os.close(client)
            return
        acl = self.acl
        if acl is not None and not acl.permits(peer[0]):
            self.counters.reject("acl")
            logger.debug("shared listener %s: refused client %s (acl)", self.key, peer[0])
            os.close(client)
            return
        cap = self.shared.tcp_cap  # clients being read hold a socket too: they count
        if cap.limit is not None and cap.open + len(self.peeks) >= cap.limit:
            self.counters.reject("limit")
            os.close(client)
            return
        live = self.members[0].live
        mode = live.proxy_header(peer[0]) if live.accepts_proxy_headers else None
        header = live.edge.accept_proxy_protocol if mode == "read" else "off"
        peek = _Peek(self, client, peer, listen,
                     NameReader(limit=PEEK_LIMIT, proxy_header=header))  # fmt: skip
        self.peeks.add(peek)
        self.readable(peek)  # the hello often came already: then no epoll entry, no timer
        if peek in self.peeks:
            peek.watched = True
            self.deadlines.add(peek, self.peek_timeout)
            self.loop.add(client, peek, EPOLLIN)

    def readable(self, peek: _Peek) -> None:
        if peek not in self.peeks:
            return
        reader = peek.reader
        while True:
            try:
                data = os.read(peek.fd, max(1, PEEK_LIMIT - reader.read))
            except BlockingIOError:
                return
            except OSError as exc:
                logger.debug("shared listener %s: client %s: %s", self.key, peek.peer[0], exc)
                self.drop(peek)
                return
            if not data:
                if reader.read:
                    self.reject(peek, "peek_invalid", "closed before its name was read")
                else:
                    self.drop(peek)
                return
            try:
                found = reader.feed(data)
            except HeaderRefusedError as exc:
                self.reject(peek, "proxy_header", f"PROXY header: {exc}")
                return
            except PeekError as exc:
                self.reject(peek, "peek_invalid", str(exc))
                return
            if found is not None:
                self._route(peek, found)
                return

    def _route(self, peek: _Peek, found: Peeked) -> None:
        server = self.table.lookup(found.name)
        if server is None:
            shown = found.name or "no name"
            self.reject(peek, "no_route", f"{found.protocol} {shown!r} matches no route")
            return
        self._forget(peek)
        source = found.source or peek.peer
        dest = found.dest or peek.listen
        server.hand(peek.fd, source, peek.peer, dest, rest=found.data, name=found.name)

    def reject(self, peek: _Peek, reason: NameRejectReason, why: str) -> None:
        if peek not in self.peeks:
            return
        self.counters.reject(reason)
        logger.info("shared listener %s: refused client %s: %s", self.key, peek.peer[0], why,
                    extra={"listen": str(self.key), "action": reason})  # fmt: skip
        self.drop(peek)

    def drop(self, peek: _Peek) -> None:
        """Close a peeking client (not counted)."""
        if peek in self.peeks:
            self._forget(peek)
            os.close(peek.fd)

    def _forget(self, peek: _Peek) -> None:
        self.peeks.discard(peek)
        if peek.watched:
            self.deadlines.discard(peek)
            self.loop.remove(peek.fd)
