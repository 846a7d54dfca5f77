"""One route's part of the table: its chains, ACL sets, timeout policy and elements (pure).

`fragment(route, policy)` returns a `Fragment`; `ruleset.build` merges the fragments of all
routes into the table. A fragment depends only on the `KernelRoute` and the global ACL, so the
engine caches it per route and rebuilds only routes that changed.

    r_N  ct mark set MARK_BASE|N (and ct timeout set tcp_S / udp_S); the global ACL (sets
         d4g a4g d6g a6g), then the route's (d4_N a4_N d6_N a6_N): deny wins, an allow list
         must match, else count (`ct mark @acl`) and refuse; `ct count over C`: count
         (`ct mark @lim`) and refuse. It does not depend on the backends: a pool change leaves
         it, and the connection list its `ct count` keeps, alone.
    n_N  dnat per family: to the one backend, or through `numgen inc` (round_robin) or `jhash`
         of the source address (source_hash) over an anonymous map of the backends.

Elements: the listen key -> jump r_N (bind4/bind6/wild4/wild6), mark -> goto n_N (nat), the
counted sets (traffic: mark . original / mark . reply; flows, nob, acl, lim: mark), masq when
the route masquerades, empty when it has no backend, and the registry entry (routes_v1:
slot, comment "DIGEST IDENTITY", the digest being that of r_N).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from labelproxy.kernel import exprs as x
from labelproxy.kernel.eligible import IPFamily, ip_of
from labelproxy.kernel.model import (
    ROUTES_SET,
    Chain,
    Json,
    KernelRoute,
    NamedSet,
    element_key,
    key_of,
)
from labelproxy.spec import EdgePolicy, IPNetwork

logger = logging.getLogger(__name__)

HASH_SEED = 0x4C50
COUNTED_SETS = ("traffic", "flows", "nob", "acl", "lim")


@dataclass(frozen=True, slots=True)
class Fragment:
    """Everything one route adds to the table."""

    chains: tuple[Chain, ...]
    sets: tuple[NamedSet, ...]
    timeouts: tuple[tuple[str, Json], ...]
    members: tuple[tuple[str, str, Json], ...]  # (set, element key, element)


def chain_digest(chain: Chain) -> str:
    """A short stable digest of a chain's rules (kept in the registry, see `r_N`)."""
    return hashlib.sha256(repr(chain.rules).encode()).hexdigest()[:12]


def timeout_object(transport: str, seconds: int) -> tuple[str, Json]:
    """The conntrack timeout policy for an idle timeout: its name and nftables body."""
    if transport == "tcp":
        policy = {"established": seconds}
    else:
        policy = {"unreplied": seconds, "replied": seconds}
    return f"{transport}_{seconds}", {"protocol": transport, "l3proto": "inet", "policy": policy}


def _acl_set(name: str, family: IPFamily, nets: Sequence[IPNetwork]) -> NamedSet:
    version = 4 if family == "ipv4" else 6
    mine = [net for net in nets if net.version == version]
    merged = ipaddress.collapse_addresses(mine)  # type: ignore[type-var]
    elements = {element_key(e): e for e in (x.prefix(net) for net in merged)}
    return NamedSet(name, x.ADDR_TYPE[family], flags=("interval",), elements=elements)


def acl_rules(
    sets: dict[str, NamedSet],
    *,
    suffix: str,
    allow: Sequence[IPNetwork],
    deny: Sequence[IPNetwork],
    families: Sequence[IPFamily],
    transport: str,
) -> list[list[Json]]:
    """One ACL layer (the global one or a route's) as rules; its sets go into `sets`."""
    rules: list[list[Json]] = []
    reject = [x.counted("acl"), x.refuse(transport)]
    for family in families:
        digit = family[-1]
        if any(net.version == int(digit) for net in deny):
            name = f"d{digit}{suffix}"
            sets.setdefault(name, _acl_set(name, family, deny))
            rules.append([x.nfproto(family), x.match(x.saddr(family), f"@{name}"), *reject])
        if not allow:
            continue
        if any(net.version == int(digit) for net in allow):
            name = f"a{digit}{suffix}"
            sets.setdefault(name, _acl_set(name, family, allow))
            rules.append(
                [x.nfproto(family), x.match(x.saddr(family), f"@{name}", "!="), *reject]
            )
        else:  # an allow list of the other family only: nobody of this family is allowed
            rules.append([x.nfproto(family), *reject])
    return rules


def _dnat(route: KernelRoute, family: IPFamily) -> list[Json] | None:
    version = 4 if family == "ipv4" else 6
    backends = [
        b for b in route.spec.backends if ip_of(b.host).version == version
    ]
    if not backends:
        return None
    head = [x.nfproto(family), x.l4proto(route.key.transport)]
    if len(backends) == 1:
        target = {"family": x.IP[family], "addr": backends[0].host, "port": backends[0].port}
        return [*head, {"dnat": target}]
    pool = [[i, {"concat": [b.host, b.port]}] for i, b in enumerate(backends)]
    selector: Json
    if route.spec.options.load_balance == "source_hash":
        selector = {"jhash": {"mod": len(pool), "seed": HASH_SEED, "expr": x.saddr(family)}}
    else:
        selector = {"numgen": {"mode": "inc", "mod": len(pool), "offset": 0}}
    addr = {"map": {"key": selector, "data": {"set": pool}}}
    return [*head, {"dnat": {"family": x.IP[family], "addr": addr}}]


def _listen_element(route: KernelRoute, family: IPFamily) -> tuple[str, Json]:
    key = route.key
    verdict = {"jump": {"target": f"r_{route.slot}"}}
    bind = ip_of(key.bind)
    digit = family[-1]
    if bind.is_unspecified:
        return f"wild{digit}", [{"concat": [key.transport, key.port]}, verdict]
    return f"bind{digit}", [{"concat": [key.transport, str(bind), key.port]}, verdict]


def fragment(route: KernelRoute, policy: EdgePolicy) -> Fragment:
    """The chains, sets, timeout policy and elements of one route (module docstring)."""
    n, mark, transport = route.slot, route.mark, route.key.transport
    sets: dict[str, NamedSet] = {}
    timeouts: list[tuple[str, Json]] = []
    admit: list[Json] = [{"mangle": {"key": x.ct("mark"), "value": mark}}]
    if route.idle_timeout is not None:
        name, body = timeout_object(transport, route.idle_timeout)
        timeouts.append((name, body))
        admit.append({"ct timeout": name})
    rules: list[list[Json]] = [admit]
    for suffix, allow, deny in (("g", policy.allow, policy.deny),
                                (f"_{n}", route.spec.options.allow, route.spec.options.deny)):
        rules += acl_rules(sets, suffix=suffix, allow=allow, deny=deny,
                           families=route.families, transport=transport)
    if route.limit is not None:
        rules.append([{"ct count": {"val": route.limit, "inv": True}}, x.counted("lim"),
                      x.refuse(transport)])
    admission = Chain(f"r_{n}", tuple(tuple(rule) for rule in rules))
    dnat = [rule for rule in (_dnat(route, f) for f in route.families) if rule is not None]
    nat = Chain(f"n_{n}", tuple(tuple(rule) for rule in dnat))
    members: list[tuple[str, Json]] = [
        _listen_element(route, family) for family in route.families
    ]
    members += [
        ("nat", [mark, {"goto": {"target": f"n_{n}"}}]),
        ("traffic", {"concat": [mark, "original"]}),
        ("traffic", {"concat": [mark, "reply"]}),
        *((name, mark) for name in COUNTED_SETS[1:]),
        (ROUTES_SET, {"elem": {"val": n,
                               "comment": f"{chain_digest(admission)} {route.identity}"}}),
    ]
    if route.masquerade:
        members.append(("masq", mark))
    if not dnat:
        members.append(("empty", mark))
    return Fragment(
        chains=(admission, nat),
        sets=tuple(sets.values()),
        timeouts=tuple(timeouts),
        members=tuple((name, element_key(key_of(e)), e) for name, e in members),
    )
