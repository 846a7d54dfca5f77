"""`LiveRoute`: the mutable side of one route's listener, and the one place that counts it.

It holds the current `RouteSpec` (swapped in place by `update` when only backends or options
change), the route's `Policy` of hooks (ACL, the route's cap, the process-wide cap of
`shared.SharedState`, extra hooks), backend selection (round robin, least connections,
source hash) and the stop/drain handshake between the control plane and the listener task
of whichever engine serves the route (`Serve`: `tcp.serve_tcp`, `udp.serve_udp`):

    live = LiveRoute(spec, counters=..., edge=..., shared=...)
    await task_group.start(serve_tcp, live)   # returns once bound; raises OSError if not
    live.update(new_spec)                      # new connections use the new backends
    live.close()                               # stop admitting, then drain (drain.py)
    await live.stopped_admitting.wait()        # no new client is taken any more
    await live.listener_closed.wait()          # the port is free again
    await live.finished.wait()                 # every connection ended or was cancelled

Accounting: every counter about a connection's life is written here, by the listener as
the connection passes: `admit` (refused with a reason, or opened), `dialed` and
`dial_failed`, `refused` (a client refused before it became a connection) and `release`
(closed: duration; a close reason that is a late refusal such as `no_backend` or
`proxy_header`). Only the volume moved (bytes, datagrams, datagrams lost) is added by the
relays themselves, inline, on their hot paths. Hooks count nothing.

Threads: `update` and `close` run on the asyncio loop (control plane); the other methods
run on the thread that owns the route's connections (TCP: the data loop; UDP: the asyncio
loop), so each counter has one writer. `update` publishes the new spec and `Policy` with
single attribute stores and keeps one `CapHook` whose limit it changes in place: a
connection admitted on the data loop during an update is counted on the same cap as the
one released later, so the cap's count cannot drift.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

import anyio
import anyio.abc

from labelproxy.metrics import RejectReason, RouteCounters
from labelproxy.spec import Backend, EdgePolicy, RouteSpec
from labelproxy.streams.acl import Acl, LayeredAcl
from labelproxy.streams.hooks import AclHook, CapHook, ConnInfo, Hook, Policy
from labelproxy.streams.shared import SharedState

logger = logging.getLogger(__name__)

ProxyHeader = Literal["read", "sniff"]
# close reasons of an admitted TCP connection that count as a refusal of the route
_LATE_REFUSALS: dict[str, RejectReason] = {
    "no_backend": "no_backend",
    "loop": "loop",
    "proxy_header": "proxy_header",
    "wake_timeout": "no_backend",  # held while its container woke, which never became ready
    "limit": "limit",  # beyond the clients held while a container wakes
}


class Serve(Protocol):
    """An engine's entry point: bind `live.spec.key` (raising OSError before "started" when
    it cannot), serve until `live.close()`, drain, then set `live.finished`."""

    def __call__(
        self, live: LiveRoute, *, task_status: anyio.abc.TaskStatus[None] = ...
    ) -> Awaitable[None]: ...


class LiveRoute:
    """State shared by a route's listener, its connections and the control plane."""

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
        # `dialed(seconds)`: an upstream connect succeeded after `seconds` (the dial
        # histogram's observe itself: no call in between on the dial path)
        self.dialed = counters.observe_dial
        self.edge = edge
        # the process-wide caps and own listeners; a route alone gets its own (tests)
        self.shared = shared if shared is not None else SharedState.from_edge(edge)
        self.global_acl = Acl(edge.allow, edge.deny)
        self.trusted_proxies = Acl(edge.trusted_proxies) if edge.trusted_proxies else None
        self.accepts_proxy_headers = edge.accept_proxy_protocol != "off"
        self._extra_hooks = extra_hooks
        self._tcp = spec.transport == "tcp"
        self._rr = itertools.count()
        self._in_flight: dict[Backend, int] = {}
        self.bound: list[tuple[str, int]] = []
        self.closing = anyio.Event()
        self.stopped_admitting = anyio.Event()
        self.listener_closed = anyio.Event()
        self.finished = anyio.Event()
        self.drain_timeout = edge.drain_timeout
        # the drain in progress (drain.py): brings its deadline closer
        self.drain_deadline: Callable[[float], None] | None = None
        self.spec = spec
        self.cap = CapHook(None)  # one for the route's life: `update` changes its limit
        self.policy = Policy()
        self.connect_timeout = edge.connect_timeout
        self.idle_timeout: float | None = None  # TCP: None unless set; UDP: session expiry
        # called (asyncio loop) after each `update`: the TCP hold wakes its clients, since a
        # new backend without an active check is ready at once, with no change to hear of
        self.updated: list[Callable[[], None]] = []
        self.update(spec)

    # -- configuration (control plane) -------------------------------------------------
    def update(self, spec: RouteSpec) -> None:
        """Adopt a new spec for the same listener; live connections are not touched."""
        if self.spec is not spec and not self.spec.same_listener(spec):
            raise ValueError(f"{spec.key} cannot replace {self.spec.key} in place")
        opts = spec.options
        acl = LayeredAcl(self.global_acl, Acl(opts.allow, opts.deny))
        self.cap.limit = spec.connection_limit(udp_default=self.edge.udp_max_sessions)
        hooks: list[Hook] = []
        if not acl.permits_all:
            hooks.append(AclHook(acl))
        hooks.append(self.cap)
        hooks.append(self.shared.cap(spec.transport))
        hooks.extend(self._extra_hooks)
        self.spec = spec
        self.policy = Policy.of(tuple(hooks))
        self.connect_timeout = opts.connect_timeout or self.edge.connect_timeout
        idle = opts.idle_timeout
        if idle is None and spec.transport == "udp":
            idle = self.edge.udp_idle_timeout
        self.idle_timeout = idle
        for listener in self.updated:
            listener()

    def proxy_header(self, host: str) -> ProxyHeader | None:
        """What to do with the first bytes of a TCP client at `host`, decided once per
        client: "read" its PROXY header (a trusted proxy, when headers are accepted),
        "sniff" them to refuse a header (anyone else, when accepted), None (not accepted:
        the bytes are relayed as they come; a hot path may skip the call when
        `accepts_proxy_headers` is false)."""
        if not self.accepts_proxy_headers:
            return None
        trusted = self.trusted_proxies is not None and self.trusted_proxies.permits(host)
        return "read" if trusted else "sniff"

    # -- backend selection -------------------------------------------------------------
    def ready_backends(self) -> tuple[Backend, ...]:
        """The pool: the spec's backends that are ready (`shared.health`), in spec order; all
        of them when no checker tracks the route. Lock-free, on the connections' thread."""
        spec = self.spec
        backends = spec.backends
        health = self.shared.health
        if health is None or not health.tracks(spec.key):
            return backends
        ready = health.ready_backends(spec.key)
        if ready == backends:
            return backends
        return tuple(b for b in backends if b in ready)

    def pick_backend(self, client_host: str) -> Backend | None:
        """Choose a ready backend for a new connection from `client_host`; None when there
        is none."""
        backends = self.ready_backends()
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

    # -- accounting (the thread that owns the connections) -----------------------------
    def admit(self, conn: ConnInfo) -> RejectReason | None:
        """Run every hook's `before_dial`; on success run `on_open` and count the opening.
        Returns the reason of a refusal (counted: a rejection, or a UDP drop)."""
        policy = self.policy
        counters = self.counters
        for hook in policy.gate:
            reason = hook.before_dial(conn)
            if reason is not None:
                if self._tcp:
                    counters.reject(reason)
                else:
                    counters.drop(reason)
                return reason
        for hook in policy.open:
            hook.on_open(conn)
        if self._tcp:
            counters.connections_total += 1
            counters.connections_active += 1
        else:
            counters.udp_sessions_active += 1
        return None

    def refused(self, reason: RejectReason) -> None:
        """A TCP client was refused before it was admitted (a bad PROXY header)."""
        self.counters.reject(reason)

    def dial_failed(self, conn: ConnInfo, backend: Backend | None, why: str) -> None:
        """A connect to `backend` failed (None: no address to dial)."""
        if backend is not None:
            self.backend_closed(backend)
        self.counters.dial_errors += 1
        logger.error("route %s: dial %s failed: %s", conn.route, backend, why)

    def release(self, conn: ConnInfo) -> None:
        """Run every hook's `on_close` and count the closing; once per admitted connection."""
        for hook in self.policy.close:
            hook.on_close(conn)
        counters = self.counters
        if self._tcp:
            counters.connections_active -= 1
            reason = conn.close_reason
            if reason in _LATE_REFUSALS:
                counters.reject(_LATE_REFUSALS[reason])
        else:
            counters.udp_sessions_active -= 1
        backend = conn.backend
        if backend is not None:  # only what was relayed: not a refusal before any dial
            counters.observe_connection(time.monotonic() - conn.started)
            self.backend_closed(backend)

    # -- lifecycle (control plane) -----------------------------------------------------
    def close(self, drain_timeout: float | None = None) -> None:
        """Ask the listener to stop admitting and drain for `drain_timeout` seconds (default
        the edge's); called again, a shorter timeout brings a drain in progress to an end
        sooner (`close(0)`: now)."""
        if drain_timeout is not None:
            self.drain_timeout = drain_timeout
            if self.drain_deadline is not None:
                self.drain_deadline(drain_timeout)
        self.closing.set()
