"""Target resolution: which address and port reach a container's TARGET port.

Pure code over a `ContainerView`. The order is the contract of DESIGN.md section 1:

1. the `host` label, verbatim;
2. host network mode: 127.0.0.1 (the daemon's host for a remote `tcp://` daemon);
3. the container's address on the network named by `proxy.network` (an error if it is not on it);
4. its address on a network labelproxy's own container is on (first in name order);
5. the host port that publishes TARGET for the route's protocol: `HostIp` when it is a specific
   address, else 127.0.0.1 (or the daemon's host); `::` alone is dialled as `::1`;
6. its address on the first of its networks in name order.

Networks on which the container has no address (`none`, a network still being attached) are
skipped. When nothing applies, `AddressError` says why; the caller turns it into a `Problem`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from labelproxy.sources.containers import ContainerView, DiscoveryContext, PortBinding
from labelproxy.spec import Transport

logger = logging.getLogger(__name__)

Via = Literal[
    "host_label", "host_network", "proxy_network", "shared_network", "published", "network"
]

_WILDCARD_V4 = frozenset({"", "0.0.0.0"})
_WILDCARD_V6 = frozenset({"::", "[::]"})


@dataclass(frozen=True, slots=True)
class Target:
    """Where to dial, and which rule of the resolution order found it."""

    host: str
    port: int
    via: Via


class AddressError(Exception):
    """No address reaches the target. `field` is the route field the problem belongs to
    (`network` when `proxy.network` names a network the container is not on, else `port`)."""

    def __init__(self, message: str, *, field: Literal["network", "port"]) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def resolve_target(
    view: ContainerView,
    ctx: DiscoveryContext,
    *,
    target_port: int,
    transport: Transport,
    host: str | None = None,
    network: str | None = None,
) -> Target:
    """The address that reaches `target_port`/`transport` of `view`; raises `AddressError`."""
    if host:
        return Target(host, target_port, "host_label")
    if view.network_mode == "host":
        return Target(ctx.local_host, target_port, "host_network")
    addresses = {name: ip for name, ip in view.networks.items() if ip}
    if network:
        if network not in addresses:
            on = ", ".join(sorted(addresses)) or "no network with an address"
            raise AddressError(
                f"the container is not on network {network!r} (it is on: {on}); expected the "
                "name of one of its networks",
                field="network",
            )
        return Target(addresses[network], target_port, "proxy_network")
    shared = sorted(name for name in addresses if name in ctx.own_networks)
    if shared:
        return Target(addresses[shared[0]], target_port, "shared_network")
    published = _published_target(view.ports, ctx, target_port=target_port, transport=transport)
    if published is not None:
        return published
    if addresses:
        first = min(addresses)
        return Target(addresses[first], target_port, "network")
    raise AddressError(
        f"no reachable address: the container (network mode {view.network_mode!r}) has no "
        f"address on any network and does not publish the target port for {transport}; "
        "expected a network, a published port, host networking or a host label",
        field="port",
    )


def _published_target(
    ports: tuple[PortBinding, ...], ctx: DiscoveryContext, *, target_port: int, transport: Transport
) -> Target | None:
    """The best host binding publishing `target_port`: IPv4 wildcard, then specific host
    addresses (in order), then the IPv6 wildcard."""
    candidates: list[tuple[int, str, int]] = []
    for binding in ports:
        if binding.port != target_port or binding.protocol != transport:
            continue
        if binding.host_port is None:
            continue
        if binding.host_ip in _WILDCARD_V4:
            candidates.append((0, ctx.local_host, binding.host_port))
        elif binding.host_ip in _WILDCARD_V6:
            candidates.append((2, ctx.daemon_host or "::1", binding.host_port))
        else:
            candidates.append((1, binding.host_ip.strip("[]"), binding.host_port))
    if not candidates:
        return None
    _, host, port = min(candidates)
    return Target(host, port, "published")
