"""The data the kernel engine works with: routes as the kernel sees them, and a table model.

`KernelRoute` is a `RouteSpec` the engine decided to forward, with what the engine chose for it:
its route number (`slot`, 1..65535; the connection mark of its flows is `MARK_BASE | slot`), the
client families it carries, whether it masquerades (the upstream then sees this host, not the
client: "client address hidden") and its effective limit and idle timeout.

`Table` models labelproxy's nftables table by name: chains (hooked or not) with their rules,
sets and maps with their elements, and conntrack timeout policies. Rules and
elements are nftables JSON (libnftables' schema) as Python values. A `Table` read back from the
kernel (`nft.read_table`) knows names and element keys but not rule contents (`rules=None`).
Everything here is pure data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from labelproxy.kernel.eligible import IPFamily
from labelproxy.spec import ListenKey, RouteSpec

logger = logging.getLogger(__name__)

Json = Any
TABLE_FAMILY = "inet"
TABLE_NAME = "labelproxy"
# the version of the table layout: a table without this set is rebuilt, not adopted
ROUTES_SET = "routes_v1"
MARK_BASE = 0x4C50_0000  # "LP" in the high half of the conntrack mark
MARK_MASK = 0xFFFF_0000
MAX_SLOT = 0xFFFF
COMMENT_MAX = 250  # nftables keeps 256 bytes of user data per element


@dataclass(frozen=True, slots=True)
class KernelRoute:
    """One route the kernel forwards, with the engine's choices for it."""

    spec: RouteSpec
    slot: int
    families: tuple[IPFamily, ...]
    masquerade: bool = False
    limit: int | None = None
    idle_timeout: int | None = None  # whole seconds; None keeps the kernel's defaults

    @property
    def key(self) -> ListenKey:
        return self.spec.key

    @property
    def mark(self) -> int:
        return MARK_BASE | self.slot

    @property
    def identity(self) -> str:
        """What makes a route the same route across applies and restarts: key and alias."""
        return route_identity(self.spec)


def route_identity(spec: RouteSpec) -> str:
    """`tcp://0.0.0.0:80 web`: a route keeps its slot (and so its counters) while this holds.

    A different alias on the same listen key is a different route: the old one drains.
    """
    text = f"{spec.key} {spec.alias}"
    if len(text.encode()) <= COMMENT_MAX:
        return text
    digest = hashlib.sha256(spec.alias.encode()).hexdigest()[:24]
    return f"{spec.key} #{digest}"


def slot_of_mark(mark: int) -> int | None:
    """The route slot of a conntrack mark, or None when the mark is not labelproxy's."""
    if mark & MARK_MASK != MARK_BASE or not mark & ~MARK_MASK:
        return None
    return mark & ~MARK_MASK


def element_key(value: Json) -> str:
    """A canonical string for an element key, to compare elements across tables."""
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, dict) and "concat" in value and len(value) == 1:
        return " . ".join(element_key(part) for part in value["concat"])
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def key_of(element: Json) -> Json:
    """The key of a set or map element: `[key, data]` -> key, `{"elem": {"val": key}}` -> key."""
    key = element[0] if isinstance(element, list) else element
    if isinstance(key, dict) and "elem" in key:
        return key["elem"]["val"]
    return key


@dataclass(frozen=True, slots=True)
class Chain:
    """A chain: `hook` is (type, hook, priority) for a base chain, None for a regular one.
    `rules` is None when read back from the kernel (contents unknown)."""

    name: str
    rules: tuple[tuple[Json, ...], ...] | None = ()
    hook: tuple[str, str, int] | None = None


@dataclass(frozen=True, slots=True)
class NamedSet:
    """A set (`data` None) or a map (`data` is the nftables map type, e.g. "verdict").
    `elements` maps `element_key(key)` -> the element as nftables JSON (key, or [key, data]).
    `counter`: every element carries a counter, bumped by each lookup that matches it."""

    name: str
    type: str | tuple[str, ...]
    flags: tuple[str, ...] = ()
    data: str | None = None
    elements: Mapping[str, Json] = field(default_factory=dict)
    counter: bool = False


@dataclass(frozen=True, slots=True)
class Table:
    """labelproxy's whole table, by name."""

    chains: Mapping[str, Chain] = field(default_factory=dict)
    sets: Mapping[str, NamedSet] = field(default_factory=dict)
    timeouts: Mapping[str, Json] = field(default_factory=dict)
