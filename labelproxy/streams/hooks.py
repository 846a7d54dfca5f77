"""Connection hooks: where policy plugs into the data plane, without editing a relay.

The data plane calls, for every TCP connection or UDP session:
  `before_dial(conn)` once the client address is known (after any PROXY header) and before any
  upstream dial: a hook returns a rejection reason to refuse, or None to let it through;
  `on_open(conn)` when it is admitted; `on_chunk(conn, direction, nbytes)` for each chunk
  relayed (sizes only, so a hook never forces the zero-copy path to copy bytes);
  `on_close(conn)` exactly once for every admitted connection.
A new policy is one new `Hook`; the relay is not edited. The ACL and the caps are hooks.
Hooks decide; they do not count: the route's counters are kept by `live.LiveRoute` (admit,
release, dials) and, for the bytes and datagrams moved, by the relays themselves.

A `Policy` is a route's hooks sorted by phase, only those that override it (`overriding`):
with the default hooks, relaying a chunk or opening a connection calls no hook at all. A
route swaps its whole `Policy` in one attribute store, so a connection never sees half of
an update.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Protocol

from labelproxy.metrics import Direction, RejectReason
from labelproxy.spec import Backend, Transport
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
    name: str = ""  # the name the client asked for (a route chosen by name: `hostnames`)


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


@dataclass(frozen=True, slots=True)
class Policy:
    """A route's hooks, and per phase the ones that override it."""

    hooks: tuple[Hook, ...] = ()
    gate: tuple[Hook, ...] = ()  # before_dial
    open: tuple[Hook, ...] = ()  # on_open
    chunk: tuple[Hook, ...] = ()  # on_chunk
    close: tuple[Hook, ...] = ()  # on_close

    @classmethod
    def of(cls, hooks: tuple[Hook, ...]) -> Policy:
        return cls(
            hooks,
            overriding(hooks, "before_dial"),
            overriding(hooks, "on_open"),
            overriding(hooks, "on_chunk"),
            overriding(hooks, "on_close"),
        )


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
    """Refuses a connection beyond `limit` concurrent ones (None: unlimited). `open` is
    counted on the thread that owns the connections; `limit` may be changed from another
    (one attribute store), so a route keeps one `CapHook` for as long as it listens."""

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
