"""What `/routes` and the log say about the path that carries a route (kernel or relay).

`RoutePath` is one route's path and why (the relay's reason; for the kernel, the client
families it carries, those left to the relay, its conntrack mark and whether the upstream sees
this host instead of the client); `with_kernel_counters` adds a kernel reading to a route's
/routes counters. Pure: no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from labelproxy.kernel.engine import RouteCounters, RouteState

logger = logging.getLogger(__name__)

Path = Literal["kernel", "relay"]
NOT_BOUND = "its listen socket is not bound: the kernel only forwards ports labelproxy holds"


@dataclass(frozen=True, slots=True)
class RoutePath:
    """Which path carries a route, and why not the kernel when it is the relay."""

    forwarding: Path
    reason: str = ""
    client_address_hidden: bool = False
    families: tuple[str, ...] = ()
    uncovered: tuple[str, ...] = ()
    mark: int | None = None
    pool: tuple[str, ...] = ()  # kernel: the backends new flows go to (its ready ones)

    def document(self) -> dict[str, Any]:
        """The route's fields on /routes."""
        doc: dict[str, Any] = {
            "forwarding": self.forwarding,
            "forwarding_reason": self.reason,
            "client_address_hidden": self.client_address_hidden,
        }
        if self.forwarding == "kernel":
            doc["kernel"] = {"families": list(self.families), "uncovered": list(self.uncovered),
                             "mark": f"{self.mark:#010x}" if self.mark is not None else None,
                             "backends": list(self.pool)}
        return doc

    def describe(self) -> str:
        """The log line's message."""
        if self.forwarding == "relay":
            return f"route forwarding: relay ({self.reason})"
        hidden = " (client address hidden: the upstream sees this host)"
        rest = f"; {'/'.join(self.uncovered)} clients on the relay" if self.uncovered else ""
        return f"route forwarding: kernel{hidden if self.client_address_hidden else ''}{rest}"


def kernel_path(state: RouteState) -> RoutePath:
    """The path of a route the kernel forwards, from the engine's state of it."""
    return RoutePath("kernel", "", state.client_address_hidden, tuple(state.families),
                     tuple(state.uncovered), state.mark, tuple(str(b) for b in state.pool))


def with_kernel_counters(counters: Mapping[str, Any], kernel: RouteCounters, *, udp: bool,
                         age: float) -> dict[str, Any]:
    """A route's /routes `counters` (the relay's share) with the kernel's added: live flows,
    and for TCP flows seen and refusals; its IP bytes and packets each way; `age`, how old the
    kernel reading is (seconds)."""
    merged = dict(counters)
    if udp:
        merged["udp_sessions_active"] = merged.get("udp_sessions_active", 0) + kernel.active
    else:
        merged["connections_active"] = merged.get("connections_active", 0) + kernel.active
        merged["connections_total"] = merged.get("connections_total", 0) + kernel.connections
        merged["rejected"] = {reason: n + kernel.rejected.get(reason, 0)
                              for reason, n in dict(merged.get("rejected", {})).items()}
    merged.update(ip_bytes_in=kernel.bytes_in, ip_bytes_out=kernel.bytes_out,
                  ip_packets_in=kernel.packets_in, ip_packets_out=kernel.packets_out,
                  kernel_counters_age=round(age, 3))
    return merged
