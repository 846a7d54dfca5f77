"""What every listener of one process shares: the global caps and its own listen addresses.

One `SharedState` is built per process (by the reconciler, from the `EdgePolicy`) and handed
to every `LiveRoute`:

- `tcp_cap` / `udp_cap`: `GlobalCapHook`s, the process-wide caps on concurrent TCP
  connections (`LABELPROXY_MAX_CONNECTIONS`) and UDP sessions
  (`LABELPROXY_UDP_MAX_SESSIONS_TOTAL`). Every route of a transport has the same hook after
  its own cap, so new work beyond the global cap is refused with reason `limit` like work
  beyond a route's cap; existing connections and sessions are never touched. Each is counted
  on one thread only: TCP on the data loop, UDP on the asyncio loop.
- `own`: `OwnListeners`, the addresses this process listens on, so that a dial which would
  land on one of them (a route whose host name resolves to loopback and whose port is one of
  ours, e.g. A -> B -> A) is refused instead of relaying into itself, each hop dialling the
  next until the descriptors run out. The check costs a dict membership test per dial.
- `listener_counters`, `forget_listener`: the own series of a listener shared by routes
  chosen by name (`tcp.names`: its refusals before a route is chosen).
- `waker`: wake on demand (`wakeup.Waker`, None: off): held clients of sleeping containers.
- `health`: the process's `HealthChecker` (None: every backend of a spec is in its pool, as
  in tests that run a route alone): which backends are ready, read lock-free per pick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from labelproxy.metrics import NAME_REJECT_REASONS, RejectReason, RouteCounters
from labelproxy.spec import (
    EdgePolicy,
    Family,
    IPAddress,
    ListenKey,
    Transport,
    bind_address,
    listener_takes,
)
from labelproxy.streams.addresses import ip_of
from labelproxy.streams.hooks import CapHook, ConnInfo

if TYPE_CHECKING:
    from labelproxy.health.checker import HealthChecker
    from labelproxy.streams.wakeup import Waker

logger = logging.getLogger(__name__)

_REARM = 0.9  # a reached cap is logged again once use fell below this share of it


class GlobalCapHook(CapHook):
    """A `CapHook` shared by every route of one transport; logs when it starts refusing."""

    def __init__(self, limit: int | None, *, what: str, setting: str) -> None:
        super().__init__(limit)
        self.what = what
        self.setting = setting
        self._refusing = False

    def before_dial(self, conn: ConnInfo) -> RejectReason | None:
        limit = self.limit
        if limit is None or self.open < limit:
            return None
        if not self._refusing:
            self._refusing = True
            logger.warning(
                "global limit of %d %s reached (%s): new ones are refused until some end",
                limit,
                self.what,
                self.setting,
                extra={"action": "limit"},
            )
        return "limit"

    def on_close(self, conn: ConnInfo) -> None:
        self.open -= 1
        if self._refusing and self.limit is not None and self.open < self.limit * _REARM:
            self._refusing = False


class OwnListeners:
    """The listeners of this process, by transport and port (`tcp`, `udp`: replaced whole on
    every change, so other threads read them without a lock), and the addresses known to be
    this host's: specific binds and the local addresses clients reached us at."""

    def __init__(self) -> None:
        self.tcp: dict[int, tuple[tuple[ListenKey, Family], ...]] = {}
        self.udp: dict[int, tuple[tuple[ListenKey, Family], ...]] = {}
        self.local: frozenset[IPAddress] = frozenset()
        self._local_lock = threading.Lock()  # written from both loops (rarely), read freely
        self._reported: set[tuple[str, tuple[str, int]]] = set()

    def add(self, key: ListenKey, family: Family) -> None:
        """A listener is bound on `key` (its real port, not 0)."""
        ports = dict(self._ports(key.transport))
        ports[key.port] = (*ports.get(key.port, ()), (key, family))
        self._store(key.transport, ports)
        ip = bind_address(key)
        if ip is not None:
            self._add_local(ip)

    def remove(self, key: ListenKey, family: Family) -> None:
        """The listener on `key` is closed."""
        ports = dict(self._ports(key.transport))
        left = list(ports.get(key.port, ()))
        if (key, family) in left:
            left.remove((key, family))
        if left:
            ports[key.port] = tuple(left)
        else:
            ports.pop(key.port, None)
        self._store(key.transport, ports)
        self._reported.clear()

    def learn(self, host: str) -> None:
        """`host` is one of this host's addresses (a client reached a listener there)."""
        ip = ip_of(host)
        if ip is not None:
            self._add_local(ip)

    def lookup(self, transport: Transport, host: str, port: int) -> ListenKey | None:
        """The listener of ours a dial to `host`:`port` (an IP address) would land on."""
        entries = self._ports(transport).get(port)
        if not entries:
            return None
        for key, family in entries:
            if listener_takes(key, family, host, local=self.local):
                return key
        return None

    def refuse(
        self, transport: Transport, host: str, port: int, *, route: str, backend: object
    ) -> ListenKey | None:
        """`lookup`, and log a hit: labelproxy refuses to dial itself (as an error the
        first time per route and address, then at debug, until a listener closes)."""
        key = self.lookup(transport, host, port)
        if key is None:
            return None
        seen = (route, (host, port))
        log = logger.debug if seen in self._reported else logger.error
        self._reported.add(seen)
        log(
            "route %s: refused to relay to %s: it is labelproxy's own listener %s (a loop)",
            route,
            backend,
            key,
            extra={"route": route, "listen": str(key), "action": "loop"},
        )
        return key

    def _add_local(self, ip: IPAddress) -> None:
        """`ip` is one of this host's addresses (`ip_of`: an IPv4-mapped one unwrapped)."""
        if ip in self.local:
            return
        with self._local_lock:
            self.local = self.local | {ip}

    def _ports(self, transport: Transport) -> dict[int, tuple[tuple[ListenKey, Family], ...]]:
        return self.tcp if transport == "tcp" else self.udp

    def _store(
        self, transport: Transport, ports: dict[int, tuple[tuple[ListenKey, Family], ...]]
    ) -> None:
        if transport == "tcp":
            self.tcp = ports
        else:
            self.udp = ports


def _listener_counters(key: ListenKey) -> RouteCounters:
    return RouteCounters(route="", listen=str(key),
                         rejected=dict.fromkeys(NAME_REJECT_REASONS, 0))  # fmt: skip


def _forget_nothing(key: ListenKey) -> None:
    pass


class SharedState:
    """The global caps, the own-listener registry and the health checker of one process."""

    def __init__(
        self,
        *,
        max_connections: int | None,
        udp_max_sessions_total: int | None,
        health: HealthChecker | None = None,
    ):
        self.tcp_cap = GlobalCapHook(
            max_connections, what="TCP connections", setting="LABELPROXY_MAX_CONNECTIONS"
        )
        self.udp_cap = GlobalCapHook(
            udp_max_sessions_total,
            what="UDP sessions",
            setting="LABELPROXY_UDP_MAX_SESSIONS_TOTAL",
        )
        self.own = OwnListeners()
        self.health = health
        # the own counters of a listener shared by routes chosen by name (`tcp.names`), by
        # its socket's key, and their end; the reconciler plugs in `Metrics.listener`/`forget`
        self.listener_counters: Callable[[ListenKey], RouteCounters] = _listener_counters
        self.forget_listener: Callable[[ListenKey], None] = _forget_nothing
        # wake on demand (`wakeup.Waker`), set by whoever runs the sleeper; None: no route
        # is held for a wake (its clients are served or refused as the pool says)
        self.waker: Waker | None = None

    @classmethod
    def from_edge(cls, edge: EdgePolicy, *, health: HealthChecker | None = None) -> SharedState:
        return cls(
            max_connections=edge.max_connections,
            udp_max_sessions_total=edge.udp_max_sessions_total,
            health=health,
        )

    def cap(self, transport: Transport) -> GlobalCapHook:
        return self.tcp_cap if transport == "tcp" else self.udp_cap

    def describe(self) -> str:
        """The caps in force, for the start-up log."""

        def text(limit: int | None) -> str:
            return "no limit" if limit is None else str(limit)

        return (
            f"{text(self.tcp_cap.limit)} TCP connections, {text(self.udp_cap.limit)} UDP sessions"
        )
