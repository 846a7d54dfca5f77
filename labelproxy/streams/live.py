"""`LiveRoute`: the mutable runtime side of one listener.

It holds the current `RouteSpec` (swapped in place by `update` when only backends or options
change), the route's counters and hooks (ACL, the route's cap, the process-wide cap of
`shared.SharedState`, metrics), backend selection (round robin, least connections,
source hash) and the stop/drain handshake between the runtime and the listener task:

    live = LiveRoute(spec, counters=..., edge=..., shared=...)
    await task_group.start(serve_tcp, live)   # returns once bound; raises OSError if not
    live.update(new_spec)                      # new connections use the new backends
    live.close()                               # stop accepting, then drain
    await live.listener_closed.wait()          # the port is free again
    await live.finished.wait()                 # every connection ended or was cancelled
"""

from __future__ import annotations

import hashlib
import itertools

import anyio

from labelproxy.metrics import RouteCounters
from labelproxy.spec import Backend, EdgePolicy, RouteSpec
from labelproxy.streams.acl import Acl, LayeredAcl
from labelproxy.streams.hooks import AclHook, CapHook, ConnInfo, Hook, MetricsHook, overriding
from labelproxy.streams.shared import SharedState


class LiveRoute:
    """State shared by a route's listener, its connections and the runtime."""

    def __init__(
        self,
        spec: RouteSpec,
        *,
        counters: RouteCounters,
        edge: EdgePolicy,
        extra_hooks: tuple[Hook, ...] = (),
        shared: SharedState | None = None,
    ) -> None:
        self.counters = counters
        self.edge = edge
        # the process-wide caps and own listeners; a route alone gets its own (tests)
        self.shared = shared if shared is not None else SharedState.from_edge(edge)
        self.global_acl = Acl(edge.allow, edge.deny)
        self.trusted_proxies = Acl(edge.trusted_proxies) if edge.trusted_proxies else None
        self._extra_hooks = extra_hooks
        self._rr = itertools.count()
        self._in_flight: dict[Backend, int] = {}
        self.bound: list[tuple[str, int]] = []
        self.closing = anyio.Event()
        self.listener_closed = anyio.Event()
        self.finished = anyio.Event()
        self.drain_timeout = edge.drain_timeout
        self.spec = spec
        self.hooks: tuple[Hook, ...] = ()
        # per phase, only the hooks that override it (the hot path skips the no-ops):
        self._gate_hooks: tuple[Hook, ...] = ()
        self._open_hooks: tuple[Hook, ...] = ()
        self._close_hooks: tuple[Hook, ...] = ()
        self.chunk_hooks: tuple[Hook, ...] = ()  # except the metrics hook (relays count)
        self.connect_timeout = edge.connect_timeout
        self.idle_timeout: float | None = None  # TCP: None unless set; UDP: session expiry
        self.cap = CapHook(None)
        self.update(spec)

    # -- configuration ---------------------------------------------------------------
    def update(self, spec: RouteSpec) -> None:
        """Adopt a new spec for the same listener; live connections are not touched."""
        if self.spec is not spec and not self.spec.same_listener(spec):
            raise ValueError(f"{spec.key} cannot replace {self.spec.key} in place")
        self.spec = spec
        opts = spec.options
        acl = LayeredAcl(self.global_acl, Acl(opts.allow, opts.deny))
        cap_limit = spec.connection_limit(udp_default=self.edge.udp_max_sessions)
        open_now = self.cap.open
        self.cap = CapHook(cap_limit)
        self.cap.open = open_now
        hooks: list[Hook] = []
        if not acl.permits_all:
            hooks.append(AclHook(acl))
        hooks.append(self.cap)
        hooks.append(self.shared.cap(spec.transport))
        hooks.append(MetricsHook(self.counters))
        hooks.extend(self._extra_hooks)
        self.hooks = tuple(hooks)
        self._gate_hooks = overriding(self.hooks, "before_dial")
        self._open_hooks = overriding(self.hooks, "on_open")
        self._close_hooks = overriding(self.hooks, "on_close")
        self.chunk_hooks = tuple(
            h for h in overriding(self.hooks, "on_chunk") if not isinstance(h, MetricsHook)
        )
        self.connect_timeout = opts.connect_timeout or self.edge.connect_timeout
        idle = opts.idle_timeout
        if idle is None and spec.transport == "udp":
            idle = self.edge.udp_idle_timeout
        self.idle_timeout = idle

    # -- backend selection -------------------------------------------------------------
    def pick_backend(self, client_host: str) -> Backend | None:
        """Choose a backend for a new connection from `client_host`; None when there is none."""
        backends = self.spec.backends
        if not backends:
            return None
        if len(backends) == 1:
            return backends[0]
        policy = self.spec.options.load_balance
        if policy == "source_hash":
            digest = hashlib.blake2b(client_host.encode(), digest_size=8).digest()
            return backends[int.from_bytes(digest, "big") % len(backends)]
        if policy == "least_conn":
            start = next(self._rr) % len(backends)
            rotated = backends[start:] + backends[:start]
            flights = self._in_flight
            return min(rotated, key=lambda b: flights.get(b, 0))
        return backends[next(self._rr) % len(backends)]

    def backend_opened(self, backend: Backend) -> None:
        flights = self._in_flight
        flights[backend] = flights.get(backend, 0) + 1

    def backend_closed(self, backend: Backend) -> None:
        flights = self._in_flight
        left = flights.get(backend, 0) - 1
        if left > 0:
            flights[backend] = left
        else:
            flights.pop(backend, None)

    # -- hooks -------------------------------------------------------------------------
    def admit(self, conn: ConnInfo) -> str | None:
        """Run every hook's `before_dial`; on success run `on_open`. Returns a reject reason."""
        for hook in self._gate_hooks:
            reason = hook.before_dial(conn)
            if reason is not None:
                if conn.transport == "tcp":
                    self.counters.reject(reason)
                else:
                    self.counters.drop(reason)
                return reason
        for hook in self._open_hooks:
            hook.on_open(conn)
        return None

    def release(self, conn: ConnInfo) -> None:
        """Run every hook's `on_close`; call once for every admitted connection."""
        for hook in self._close_hooks:
            hook.on_close(conn)
        if conn.backend is not None:
            self.backend_closed(conn.backend)

    # -- lifecycle ---------------------------------------------------------------------
    def close(self, drain_timeout: float | None = None) -> None:
        """Ask the listener to stop accepting and drain for `drain_timeout` seconds."""
        if drain_timeout is not None:
            self.drain_timeout = drain_timeout
        self.closing.set()
