"""Client address filtering: allow/deny CIDR lists, global and per route.

Deny wins; an empty allow list allows everyone; a route's rules narrow the global ones
(a client must pass both). IPv4-mapped IPv6 clients (`::ffff:10.0.0.1`) match IPv4 rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache, partial

from labelproxy.spec import IPNetwork
from labelproxy.streams.addresses import ip_of


class Acl:
    """One allow/deny pair. `permits` is cached per address string: O(1) on the hot path.
    (The cache holds the rules, not the `Acl`: no reference cycle, so a route's ACL goes
    with its route by reference counting alone.)"""

    __slots__ = ("_allow", "_deny", "permits", "permits_all")

    def __init__(self, allow: Iterable[IPNetwork] = (), deny: Iterable[IPNetwork] = ()) -> None:
        self._allow = tuple(allow)
        self._deny = tuple(deny)
        self.permits_all = not self._allow and not self._deny
        self.permits: Callable[[str], bool] = (
            _everyone
            if self.permits_all
            else lru_cache(maxsize=4096)(partial(_permits, self._allow, self._deny))
        )


class LayeredAcl:
    """The global ACL and a route's ACL: a client must pass both."""

    __slots__ = ("_layers", "permits", "permits_all")

    def __init__(self, *layers: Acl) -> None:
        self._layers = tuple(layer for layer in layers if not layer.permits_all)
        self.permits_all = not self._layers
        # one layer (the common case): its cached check itself, no generator per client
        self.permits: Callable[[str], bool] = (
            self._layers[0].permits
            if len(self._layers) == 1
            else partial(_all_permit, tuple(layer.permits for layer in self._layers))
        )


def _everyone(host: str) -> bool:
    return True


def _permits(allow: tuple[IPNetwork, ...], deny: tuple[IPNetwork, ...], host: str) -> bool:
    ip = ip_of(host)
    if ip is None:
        return False
    if any(ip in net for net in deny if net.version == ip.version):
        return False
    if not allow:
        return True
    return any(ip in net for net in allow if net.version == ip.version)


def _all_permit(checks: tuple[Callable[[str], bool], ...], host: str) -> bool:
    return all(check(host) for check in checks)
