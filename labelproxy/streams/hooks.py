"""Connection hooks: the one place where policy plugs into the relay.

The data plane calls, for every TCP connection or UDP session:
  `before_dial(conn)` once the client address is known (after any PROXY header) and before any
  upstream dial: a hook returns a rejection reason to refuse, or None to let it through;
  `on_open(conn)` when it is admitted; `on_chunk(conn, direction, nbytes)` for each chunk
  relayed (sizes only, so a hook never forces the zero-copy path to copy bytes);
  `on_close(conn)` exactly once for every admitted connection.
A new policy is one new `Hook`; the relay is not edited. ACL, caps and metrics are hooks.
Only the hooks that override a phase are called for it (`overriding`), and the relays add
byte counts to the connection and the route's counters themselves: with the default hooks,
relaying a chunk calls no hook at all.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from labelproxy.metrics import Direction, RejectReason, RouteCounters
from labelproxy.spec import Backend, Transport

if TYPE_CHECKING:
    from labelproxy.streams.acl import LayeredAcl


@dataclass(slots=True, eq=False)
class ConnInfo:
    """One TCP connection or UDP session, as hooks and the access log see it."""

    route: str
    transport: Transport
    client: tuple[str, int]
    peer: tuple[str, int]
    listen: tuple[str, int]
    backend: Backend | None = None
    started: float = field(default_factory=time.monotonic)
    bytes_in: int = 0
    bytes_out: int = 0
    close_reason: str = ""


class Hook(Protocol):
    def before_dial(self, conn: ConnInfo) -> RejectReason | None: ...

    def on_open(self, conn: ConnInfo) -> None: ...

    def on_chunk(self, conn: ConnInfo, direction: Direction, nbytes: int) -> None: ...

    def on_close(self, conn: ConnInfo) -> None: ...


class BaseHook:
    """A hook that does nothing; subclass and override what you need."""

    def before_dial(self, conn: ConnInfo) -> RejectReason | None:
        return None

    def on_open(self, conn: ConnInfo) -> None:
        return None

    def on_chunk(self, conn: ConnInfo, direction: Direction, nbytes: int) -> None:
        return None

    def on_close(self, conn: ConnInfo) -> None:
        return None


def overriding(hooks: tuple[Hook, ...], method: str) -> tuple[Hook, ...]:
    """The hooks whose `method` does something (a `BaseHook` no-op is left out)."""
    return tuple(h for h in hooks if _overrides(type(h), method))


@functools.cache
def _overrides(cls: type, method: str) -> bool:
    default = getattr(BaseHook, method)
    return getattr(cls, method, default) is not default


class AclHook(BaseHook):
    """Refuses clients the global and route ACLs do not permit."""

    def __init__(self, acl: LayeredAcl) -> None:
        self.acl = acl

    def before_dial(self, conn: ConnInfo) -> RejectReason | None:
        return None if self.acl.permits(conn.client[0]) else "acl"


class CapHook(BaseHook):
    """Refuses a connection beyond `limit` concurrent ones (None: unlimited)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.open = 0

    def before_dial(self, conn: ConnInfo) -> RejectReason | None:
        if self.limit is not None and self.open >= self.limit:
            return "limit"
        return None

    def on_open(self, conn: ConnInfo) -> None:
        self.open += 1

    def on_close(self, conn: ConnInfo) -> None:
        self.open -= 1


class MetricsHook(BaseHook):
    """Feeds a route's `RouteCounters` as connections open and close. Byte and datagram
    counts are added by the relays themselves (once per chunk or batch, no hook call)."""

    def __init__(self, counters: RouteCounters) -> None:
        self.counters = counters

    def on_open(self, conn: ConnInfo) -> None:
        if conn.transport == "tcp":
            self.counters.connections_total += 1
            self.counters.connections_active += 1
        else:
            self.counters.udp_sessions_active += 1

    def on_close(self, conn: ConnInfo) -> None:
        if conn.transport == "tcp":
            self.counters.connections_active -= 1
        else:
            self.counters.udp_sessions_active -= 1
        if conn.backend is not None:  # only what was relayed: not a datagram with no backend
            self.counters.observe_connection(time.monotonic() - conn.started)
