"""`LiveRoute`: the mutable runtime side of one listener.

It holds the current `RouteSpec` (swapped in place by `update` when only backends or options
change), the route's counters and hooks, backend selection (round robin, least connections,
source hash) and the stop/drain handshake between the runtime and the listener task:

    live = LiveRoute(spec, counters=..., edge=...)
    await task_group.start(serve_tcp, live)   # returns once bound; raises OSError if not
    live.update(new_spec)                      # new connections use the new backends
    live.close()                               # stop accepting, then drain
    await live.listener_closed.wait()          # the port is free again
    await live.finished.wait()                 # every connection ended or was cancelled
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter

import anyio

from labelproxy.metrics import RouteCounters
from labelproxy.spec import Backend, EdgePolicy, RouteSpec
from labelproxy.streams.acl import Acl, LayeredAcl
from labelproxy.streams.hooks import AclHook, CapHook, ConnInfo, Hook, MetricsHook


class LiveRoute:
    """State shared by a route's listener, its connections and the runtime."""

    def __init__(
        self,
        spec: RouteSpec,
        *,
        counters: RouteCounters,
        edge: EdgePolicy,
        extra_hooks: tuple[Hook, ...] = (),
    ) -> None:
        self.counters = counters
        self.edge = edge
        self.global_acl = Acl(edge.allow, edge.deny)
        self.trusted_proxies = Acl(edge.trusted_proxies) if edge.trusted_proxies else None
        self._extra_hooks = extra_hooks
        self._rr = itertools.count()
        self._in_flight: Counter[Backend] = Counter()
        self.bound: list[tuple[str, int]] = []
        self.closing = anyio.Event()
        self.listener_closed = anyio.Event()
        self.finished = anyio.Event()
        self.drain_timeout = edge.drain_timeout
        self.spec = spec
        self.hooks: tuple[Hook, ...] = ()
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
        hooks.append(MetricsHook(self.counters))
        hooks.extend(self._extra_hooks)
        self.hooks = tuple(hooks)

    @property
    def connect_timeout(self) -> float:
        return self.spec.options.connect_timeout or self.edge.connect_timeout

    @property
    def idle_timeout(self) -> float | None:
        """TCP: None (no idle limit) unless set; UDP: the session expiry."""
        value = self.spec.options.idle_timeout
        if value is None and self.spec.transport == "udp":
            return self.edge.udp_idle_timeout
        return value

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
            return min(rotated, key=self._in_flight.__getitem__)
        return backends[next(self._rr) % len(backends)]

    def backend_opened(self, backend: Backend) -> None:
        self._in_flight[backend] += 1

    def backend_closed(self, backend: Backend) -> None:
        self._in_flight[backend] -= 1
        if self._in_flight[backend] <= 0:
            del self._in_flight[backend]

    # -- hooks -------------------------------------------------------------------------
    def admit(self, conn: ConnInfo) -> str | None:
        """Run every hook's `before_dial`; on success run `on_open`. Returns a reject reason."""
        for hook in self.hooks:
            reason = hook.before_dial(conn)
            if reason is not None:
                if conn.transport == "tcp":
                    self.counters.reject(reason)
                else:
                    self.counters.drop(reason)
                return reason
        for hook in self.hooks:
            hook.on_open(conn)
        return None

    def release(self, conn: ConnInfo) -> None:
        """Run every hook's `on_close`; call once for every admitted connection."""
        for hook in self.hooks:
            hook.on_close(conn)
        if conn.backend is not None:
            self.backend_closed(conn.backend)

    # -- lifecycle ---------------------------------------------------------------------
    def close(self, drain_timeout: float | None = None) -> None:
        """Ask the listener to stop accepting and drain for `drain_timeout` seconds."""
        if drain_timeout is not None:
            self.drain_timeout = drain_timeout
        self.closing.set()
