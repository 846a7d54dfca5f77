"""Facts about the network namespace the engine runs in, and the one sysctl it sets.

`returns_here(address)` decides whether a backend's replies come back through this host, so the
kernel can forward with the client's own source address (the upstream sees the real client), or
must masquerade ("client address hidden"). Replies return here when the backend is a local
address (loopback, a host-network container, a port published on one of this host's addresses),
or sits directly on a local bridge or veth (containers, whose default route is this host). A
backend reached through a gateway, or on a plain LAN segment, might answer the client directly,
so it is masqueraded. The route lookup uses pyroute2 (`RTM_GETROUTE`, as `ip route get` does).

`route_localnet()` / `set_route_localnet()` read and set `net.ipv4.conf.all.route_localnet`:
remote clients DNAT'ed to 127.0.0.1 (host-network containers) are routed only with it on, and
so are loopback clients DNAT'ed to an address elsewhere (`localnet_clients` says which clients
of a route need it). The ruleset then installs kube-proxy's guard (packets from outside
addressed to 127.0.0.0/8 are dropped), so the sysctl opens nothing else. Where it cannot be
switched on (a container's read-only /proc/sys), the engine leaves the routes that need it to
the relay. `ip_forward()` says whether the namespace routes between interfaces, which backends
that are not local addresses need.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from labelproxy.spec import RouteSpec

logger = logging.getLogger(__name__)

SYSCTL = Path("/proc/sys")
ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"
RTN_LOCAL = 2
LOCAL_KINDS = frozenset({"bridge", "veth"})


def read_sysctl(name: str, *, root: Path = SYSCTL) -> str:
    """The value of /proc/sys/`name` (`net/ipv4/ip_forward`), stripped."""
    return (root / name).read_text().strip()


def write_sysctl(name: str, value: str, *, root: Path = SYSCTL) -> None:
    """Set /proc/sys/`name`; raises OSError when not permitted."""
    (root / name).write_text(value)


def route_localnet() -> bool:
    """True when `net.ipv4.conf.all.route_localnet` is on."""
    return read_sysctl(ROUTE_LOCALNET) == "1"


def set_route_localnet(on: bool) -> None:
    """Switch `net.ipv4.conf.all.route_localnet` (this namespace only)."""
    write_sysctl(ROUTE_LOCALNET, "1" if on else "0")


def localnet_clients(spec: RouteSpec) -> str | None:
    """Which IPv4 clients of `spec` the kernel can forward only with route_localnet on, in
    words (None: none): remote clients of a loopback backend (unless the route listens on
    loopback only), loopback clients of any other backend (when the route listens on
    loopback)."""
    bind = ipaddress.ip_address(spec.key.bind.split("%", 1)[0])
    loopback_only = bind.version == 4 and bind.is_loopback
    takes_loopback = bind.is_unspecified or loopback_only
    for backend in spec.backends:
        ip = ipaddress.ip_address(backend.host)
        if ip.version != 4:
            continue
        if ip.is_loopback and not loopback_only:
            return f"remote clients of the loopback backend {backend}"
        if not ip.is_loopback and takes_loopback:
            return f"loopback clients of the backend {backend}"
    return None


def ip_forward(version: int) -> bool:
    """True when this namespace forwards IPv4 (`version` 4) or IPv6 packets."""
    name = "net/ipv4/ip_forward" if version == 4 else "net/ipv6/conf/all/forwarding"
    try:
        return read_sysctl(name) == "1"
    except OSError:
        return False


@contextlib.contextmanager
def _ipr() -> Iterator[Any]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _link_kind(ipr: Any, index: int) -> str:
    for link in ipr.get_links(index):
        info = link.get_attr("IFLA_LINKINFO")
        if info is not None:
            return str(info.get_attr("IFLA_INFO_KIND") or "")
    return ""


class PathCache:
    """How each backend address is reached, looked up once per address (one apply)."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}
        self._forwarding: dict[int, bool] = {}

    def forwarding(self, version: int) -> bool:
        """`ip_forward(version)`, read once per cache."""
        if version not in self._forwarding:
            self._forwarding[version] = ip_forward(version)
        return self._forwarding[version]

    def kind(self, address: str) -> str:
        """`local` (an address of this host), `attached` (on a local bridge or veth) or
        `routed` (through a gateway or a plain interface, or unreachable)."""
        if address not in self._known:
            ip = ipaddress.ip_address(address)
            self._known[address] = "local" if ip.is_loopback else self._lookup(address)
        return self._known[address]

    def returns_here(self, address: str) -> bool:
        """True when replies from `address` come back through this host (module docstring)."""
        return self.kind(address) != "routed"

    @staticmethod
    def _lookup(address: str) -> str:
        try:
            with _ipr() as ipr:
                routes = ipr.route("get", dst=address)
                if not routes:
                    return "routed"
                route = routes[0]
                if route["type"] == RTN_LOCAL:
                    return "local"
                if route.get_attr("RTA_GATEWAY") is not None:
                    return "routed"
                oif = route.get_attr("RTA_OIF")
                if oif is not None and _link_kind(ipr, int(oif)) in LOCAL_KINDS:
                    return "attached"
                return "routed"
        except OSError as exc:  # no route: the kernel will not reach it either way
            logger.debug("route lookup for %s failed: %s", address, exc)
            return "routed"
