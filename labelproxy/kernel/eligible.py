"""Which routes the kernel can carry, and why not (pure: no I/O).

`eligible(spec, policy=...)` answers for one `RouteSpec` with a `Verdict`: `kernel` is True when
nftables can forward the route with the same behaviour the relay gives it, `reason` says why not
(one line, shown on `/routes` and logged once), and `families` names the client address families
the kernel forwards. A dual-stack listener (`::` with a plain `tcp`/`udp` scheme) whose backends
all have one address family is carried for that family only (the kernel cannot translate IPv6 to
IPv4); `uncovered` then names the other family, whose clients reach the socket labelproxy holds on
the listen port (the relay, if the caller keeps it listening there).

The kernel carries: TCP and UDP, IPv4 and IPv6, any bind address, ACLs, `max_connections`,
`idle_timeout`, `round_robin` and `source_hash`. It does not carry: routes chosen by name
(`hostnames`: the relay reads the name), PROXY protocol in either direction, `least_conn`,
backends given as host names, an IPv6 loopback backend (`::1`) behind a
listener that remote clients reach, and any option this module does not know (a new field of
`RouteOptions` with a non-default value sends the route to the relay until the kernel learns it).
`connect_timeout` has no kernel meaning (the client's own SYN retries apply) and is ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
from dataclasses import dataclass
from typing import Literal

from labelproxy.spec import EdgePolicy, RouteOptions, RouteSpec

logger = logging.getLogger(__name__)

IPFamily = Literal["ipv4", "ipv6"]

# RouteOptions fields the kernel path understands; anything else with a non-default value
# means relay. `connect_timeout` is listed because it is harmless (nothing to dial);
# `healthcheck` because the kernel's pools are the backends the health checker says are ready
# (`KernelEngine.apply(..., ready=)`), as the relay's are.
KNOWN_OPTIONS = frozenset(
    {
        "healthcheck",
        "proxy_protocol",
        "allow",
        "deny",
        "max_connections",
        "idle_timeout",
        "connect_timeout",
        "load_balance",
    }
)
KERNEL_BALANCERS = frozenset({"round_robin", "source_hash"})


@functools.lru_cache(maxsize=8192)
def ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address literal (a zone id dropped), parsed once: thousands of routes share a few
    bind and backend addresses, and `ipaddress` parsing was most of a route's planning time.
    Raises ValueError for a host name."""
    return ipaddress.ip_address(text.split("%", 1)[0])


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the kernel forwards a route; if not, `reason` says why in one line."""

    kernel: bool
    reason: str = ""
    families: tuple[IPFamily, ...] = ()
    uncovered: tuple[IPFamily, ...] = ()


def relay(reason: str) -> Verdict:
    """A verdict for the relay, with its reason."""
    return Verdict(kernel=False, reason=reason)


def listen_families(spec: RouteSpec) -> tuple[IPFamily, ...]:
    """The client address families a route's listener takes (as `streams.sockets` binds it)."""
    ip = ip_of(spec.key.bind)
    if ip.version == 4:
        return ("ipv4",)
    if spec.family == "dual" and ip.is_unspecified:
        return ("ipv4", "ipv6")
    return ("ipv6",)


def _unknown_option(options: RouteOptions) -> str | None:
    for item in dataclasses.fields(options):
        if item.name in KNOWN_OPTIONS:
            continue
        value = getattr(options, item.name)
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = object()  # a required field: whatever it holds is not "default"
        if value != default:
            if item.name == "forwarding":
                if value == "relay":
                    return "forwarding: relay asked for by the route"
                continue
            return f"option {item.name}={value!r} needs the relay"
    return None


def eligible(spec: RouteSpec, *, policy: EdgePolicy) -> Verdict:
    """Can nftables carry `spec` with the relay's behaviour? Pure; see the module docstring."""
    options = spec.options
    if spec.key.names:
        return relay("hostnames: the route is chosen by the name in the client's first bytes")
    if options.proxy_protocol is not None:
        return relay(f"proxy_protocol {options.proxy_protocol} writes a header upstream")
    if policy.accept_proxy_protocol != "off":
        return relay(
            f"LABELPROXY_ACCEPT_PROXY_PROTOCOL={policy.accept_proxy_protocol} reads a header "
            "from clients"
        )
    if options.load_balance not in KERNEL_BALANCERS:
        return relay(f"load_balance {options.load_balance} needs per-connection state")
    if options.sleep is not None:
        return relay("wake on demand (idle_timeout at container level) needs the relay")
    unknown = _unknown_option(options)
    if unknown is not None:
        return relay(unknown)
    try:
        bind = ip_of(spec.key.bind)
    except ValueError:
        return relay(f"bind {spec.key.bind!r} is not an IP address")
    if isinstance(bind, ipaddress.IPv6Address) and bind.ipv4_mapped is not None:
        return relay(f"bind {spec.key.bind} is an IPv4-mapped IPv6 address")
    by_family: dict[IPFamily, int] = {"ipv4": 0, "ipv6": 0}
    for backend in spec.backends:
        try:
            ip = ip_of(backend.host)
        except ValueError:
            return relay(f"backend {backend.host} is a host name; the kernel needs an address")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return relay(f"backend {backend} is an IPv4-mapped IPv6 address")
        if ip.version == 6 and ip.is_loopback and not bind.is_loopback:
            return relay(f"backend {backend} is IPv6 loopback: forwarded packets cannot reach it")
        by_family["ipv4" if ip.version == 4 else "ipv6"] += 1
    listening = listen_families(spec)
    if not spec.backends:  # refused in the kernel with reason no_backend, as the relay does
        return Verdict(kernel=True, families=listening)
    carried = tuple(family for family in listening if by_family[family])
    if not carried:
        have = ", ".join(str(b) for b in spec.backends)
        return relay(
            f"listens on {'/'.join(listening)} but its backends ({have}) are of the other "
            "address family"
        )
    uncovered = tuple(family for family in listening if family not in carried)
    return Verdict(kernel=True, families=carried, uncovered=uncovered)
