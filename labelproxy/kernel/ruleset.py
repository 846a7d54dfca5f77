"""The desired nftables table for a set of kernel routes (pure: `KernelRoute`s in, `Table` out).

Layout of table `inet labelproxy` (per-route chains r_N and n_N: see `routerules`):

    pre     filter, prerouting, -150  iif lo: return (handled in `out` already); when
                                      route_localnet is on, packets from outside addressed to
                                      127.0.0.0/8 are dropped (kube-proxy's martian guard);
                                      new flows: jump new; every packet of a labelproxy flow
                                      is counted per direction: `ct mark . ct direction
                                      @traffic`
    out     filter, output, -150      the same for local clients
    new     a flow marked already (a retransmitted SYN): return; else the listen key is
            looked up - bind4/bind6 (proto . daddr . dport: a route bound to one address),
            wild4/wild6 (proto . dport: a wildcard bind, for local destinations only, `fib
            daddr type local`) - and jumps to r_N, which marks the flow (or refuses it). Then
            a marked TCP flow that does not start with a SYN (an expired or cut flow picked up
            mid-stream) is reset, and a flow of a route without backend (set `empty`) is
            counted (`@nob`) and refused.
    prenat  nat, prerouting, -100     new flows: `ct mark @flows` (counts each flow once: nat
                                      chains see only a flow's first packet), `ct mark vmap
                                      @nat` -> n_N
    outnat  nat, output, -100         the same for local clients
    postnat nat, postrouting, 100     `ct mark @masq`: masquerade (routes whose replies would
                                      not come back through this host); a loopback client
                                      sent to a non-loopback backend: masquerade

Counters live in sets with per-element counters (`traffic`, `flows`, `nob`, `acl`, `lim`),
one element per route: adding a route adds elements, not objects, and one listing of the
table's sets reads them all. Refusing is a TCP reset or, for UDP, a silent drop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from labelproxy.kernel import exprs as x
from labelproxy.kernel.model import (
    ROUTES_SET,
    Chain,
    Json,
    KernelRoute,
    NamedSet,
    Table,
    element_key,
    key_of,
)
from labelproxy.kernel.routerules import COUNTED_SETS, Fragment, fragment
from labelproxy.spec import EdgePolicy

logger = logging.getLogger(__name__)

LOCALNET_NOTE = "route_localnet switched on by labelproxy"
FILTER_PRIORITY, DNAT_PRIORITY, SNAT_PRIORITY = -150, -100, 100


def _lookup_chain() -> Chain:
    rules: list[tuple[Json, ...]] = [(x.OUR_MARK, x.RETURN)]
    proto, dport = x.meta("l4proto"), x.payload("th", "dport")
    local = x.match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    for family in ("ipv4", "ipv6"):
        digit, daddr = family[-1], x.payload(x.IP[family], "daddr")
        rules.append((x.nfproto(family), {"vmap": {"key": {"concat": [proto, daddr, dport]},
                                                   "data": f"@bind{digit}"}}))
        rules.append((x.nfproto(family), local,
                      {"vmap": {"key": {"concat": [proto, dport]}, "data": f"@wild{digit}"}}))
    flags = x.payload("tcp", "flags")
    rules.append((x.l4proto("tcp"), x.OUR_MARK,
                  x.match({"&": [flags, ["fin", "syn", "rst", "ack"]]}, "syn", "!="),
                  x.refuse("tcp")))
    for transport in ("tcp", "udp"):
        rules.append((x.l4proto(transport), x.match(x.ct("mark"), "@empty"), x.counted("nob"),
                      x.refuse(transport)))
    return Chain("new", tuple(rules))


def base_chains(*, localnet_guard: bool) -> dict[str, Chain]:
    """The hooked chains and the listen lookup, which do not depend on the routes."""
    count = (x.match({"concat": [x.ct("mark"), x.ct("direction")]}, "@traffic"),)
    new_flow = (x.match(x.ct("state"), "new", "in"), {"jump": {"target": "new"}})
    pre: list[tuple[Json, ...]] = [(x.match(x.meta("iif"), "lo"), x.RETURN)]
    if localnet_guard:
        pre.append((x.match(x.payload("ip", "daddr"), x.prefix("127.0.0.0/8")), x.DROP))
    pre += [new_flow, count]
    # only flows of their own (ct state new), not the reset a refusal sends: it carries the
    # refused flow's conntrack entry as "related" and goes through the nat hooks too
    new = x.match(x.ct("state"), "new", "in")
    nat = ((new, x.counted("flows"), {"vmap": {"key": x.ct("mark"), "data": "@nat"}}),)
    hairpin = (x.OUR_MARK, x.match(x.payload("ip", "saddr"), x.prefix("127.0.0.0/8")),
               x.match(x.meta("oif"), "lo", "!="), x.MASQUERADE)
    post = ((x.match(x.ct("mark"), "@masq"), x.MASQUERADE), hairpin)
    chains = [
        Chain("pre", tuple(pre), ("filter", "prerouting", FILTER_PRIORITY)),
        Chain("out", (new_flow, count), ("filter", "output", FILTER_PRIORITY)),
        _lookup_chain(),
        Chain("prenat", nat, ("nat", "prerouting", DNAT_PRIORITY)),
        Chain("outnat", nat, ("nat", "output", DNAT_PRIORITY)),
        Chain("postnat", post, ("nat", "postrouting", SNAT_PRIORITY)),
    ]
    return {chain.name: chain for chain in chains}


def empty_sets() -> dict[str, NamedSet]:
    """The maps and sets every table has, without elements."""
    proto, port = "inet_proto", "inet_service"
    sets = [
        NamedSet("bind4", (proto, "ipv4_addr", port), data="verdict"),
        NamedSet("bind6", (proto, "ipv6_addr", port), data="verdict"),
        NamedSet("wild4", (proto, port), data="verdict"),
        NamedSet("wild6", (proto, port), data="verdict"),
        NamedSet("nat", "mark", data="verdict"),
        NamedSet("traffic", ("mark", "ct_dir"), counter=True),
        *(NamedSet(name, "mark", counter=True) for name in COUNTED_SETS[1:]),
        NamedSet("masq", "mark"),
        NamedSet("empty", "mark"),
        NamedSet(ROUTES_SET, "mark"),
    ]
    return {named.name: named for named in sets}


def build(
    routes: Iterable[KernelRoute],
    *,
    policy: EdgePolicy,
    localnet_guard: bool,
    localnet_owned: bool = False,
    fragments: dict[KernelRoute, Fragment] | None = None,
) -> Table:
    """The whole table that forwards `routes` (pure; see the module docstring).

    `localnet_guard` installs the martian guard; `localnet_owned` records in the registry
    (slot 0) that labelproxy switched route_localnet on, so a successor switches it off.
    `fragments` caches each route's part between calls (the caller keeps the dict; entries
    of routes not passed are dropped from it).
    """
    cache = fragments if fragments is not None else {}
    wanted = list(routes)
    chains = base_chains(localnet_guard=localnet_guard)
    extra: dict[str, NamedSet] = {}
    timeouts: dict[str, Json] = {}
    members: dict[str, dict[str, Json]] = {}
    if localnet_owned:
        note = {"elem": {"val": 0, "comment": LOCALNET_NOTE}}
        members[ROUTES_SET] = {element_key(key_of(note)): note}
    for route in sorted(wanted, key=lambda r: r.slot):
        part = cache.get(route)
        if part is None:
            part = cache[route] = fragment(route, policy)
        chains.update((chain.name, chain) for chain in part.chains)
        extra.update((named.name, named) for named in part.sets)
        timeouts.update(part.timeouts)
        for set_name, key, element in part.members:
            members.setdefault(set_name, {})[key] = element
    for stale in set(cache) - set(wanted):
        del cache[stale]
    sets = empty_sets()
    for name, elements in members.items():
        base = sets[name]
        sets[name] = NamedSet(base.name, base.type, base.flags, base.data, elements,
                              counter=base.counter)
    sets.update(extra)
    return Table(chains=chains, sets=sets, timeouts=timeouts)
