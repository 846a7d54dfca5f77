"""The desired nftables table for a set of kernel routes (pure: `KernelRoute`s in, `Table` out).

Layout of table `inet labelproxy` (names with `N` are per route slot):

    pre    filter, prerouting, -150   iif lo: return (seen in `out` already); remote packets to
                                      127.0.0.0/8: drop (kube-proxy's martian guard, installed
                                      when route_localnet is on); new flows: jump new; then the
                                      per-direction counter of the flow's mark (map `ctr`)
    out    filter, output, -150       the same for local clients (no lo/guard rules)
    new    new flows: already marked (a retransmitted SYN): return; else look the listen key
           up: maps bind4/bind6 (proto . daddr . dport, a route bound to one address) and
           wild4/wild6 (proto . dport, a wildcard bind, only for local destinations:
           `fib daddr type local`) -> goto r_N
    r_N    admission: TCP that is not a SYN (an expired or cut flow picked up mid-stream):
           reset; ACL (global sets ga4/gd4/ga6/gd6, then the route's a4_N/d4_N/a6_N/d6_N;
           deny wins, an allow list must match) -> counter acl_N, refuse; no backend ->
           counter nob_N, refuse; jump l_N_LIMIT; ct mark set MARK_BASE|N; ct timeout set
           tcp_S / udp_S; counter new_N
    l_N_C  `ct count over C` -> counter lim_N, refuse. Its own chain, named by its content,
           so rewriting r_N (ACL or backends changed) or adopting the table after a restart
           keeps the connection list that ct count holds.
    prenat nat, prerouting, -100      ct mark vmap @nat -> goto n_N
    outnat nat, output, -100          the same for local clients
    n_N    dnat per family to the backend, or `numgen inc` (round_robin) / `jhash` of the
           source address (source_hash) over a map of backends
    postnat nat, postrouting, 100     ct mark @masq: masquerade (routes whose replies would not
                                      come back through this host); loopback clients sent to a
                                      non-loopback backend: masquerade
    sets   routes_v1 (slot, comment = route identity: the registry read back on adoption),
           masq; counters new_N in_N out_N acl_N lim_N nob_N; ct timeouts tcp_S udp_S

Refusing is `reject with tcp reset` for TCP (the client sees "connection refused") and a silent
drop for UDP.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence

from labelproxy.kernel.eligible import IPFamily
from labelproxy.kernel.model import (
    MARK_BASE,
    ROUTES_SET,
    Chain,
    Json,
    KernelRoute,
    NamedSet,
    Table,
    element_key,
)
from labelproxy.spec import EdgePolicy, IPNetwork

logger = logging.getLogger(__name__)

HASH_SEED = 0x4C50
LOCALNET_NOTE = "route_localnet switched on by labelproxy"
LISTEN_MAPS = ("bind4", "bind6", "wild4", "wild6")
IP = {"ipv4": "ip", "ipv6": "ip6"}
ADDR_TYPE = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _ct(key: str) -> Json:
    return {"ct": {"key": key}}


def _saddr(family: IPFamily) -> Json:
    return {"payload": {"protocol": IP[family], "field": "saddr"}}


def _match(left: Json, right: Json, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _nfproto(family: IPFamily) -> Json:
    return _match(_meta("nfproto"), family)


OUR_MARK = _match(_ct("mark"), {"prefix": {"addr": MARK_BASE, "len": 16}})
RETURN: Json = {"return": None}


def _refuse(transport: str) -> Json:
    return {"reject": {"type": "tcp reset"}} if transport == "tcp" else {"drop": None}


def _prefix(net: IPNetwork) -> Json:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _acl_set(name: str, family: IPFamily, nets: Iterable[IPNetwork]) -> NamedSet:
    version = 4 if family == "ipv4" else 6
    mine = [net for net in nets if net.version == version]
    merged = ipaddress.collapse_addresses(mine)  # type: ignore[type-var]
    elements = {element_key(e): e for e in (_prefix(net) for net in merged)}
    return NamedSet(name, ADDR_TYPE[family], flags=("interval",), elements=elements)


def _acl_rules(
    sets: dict[str, NamedSet],
    *,
    suffix: str,
    allow: Sequence[IPNetwork],
    deny: Sequence[IPNetwork],
    families: Sequence[IPFamily],
    refuse: Json,
    counter: str,
) -> list[list[Json]]:
    """One ACL layer (the global one or a route's) as rules; its sets go into `sets`."""
    rules: list[list[Json]] = []
    reject = [{"counter": counter}, refuse]
    for family in families:
        digit = family[-1]
        if any(net.version == int(digit) for net in deny):
            name = f"d{digit}{suffix}"
            sets.setdefault(name, _acl_set(name, family, deny))
            rules.append([_nfproto(family), _match(_saddr(family), f"@{name}"), *reject])
        if not allow:
            continue
        if any(net.version == int(digit) for net in allow):
            name = f"a{digit}{suffix}"
            sets.setdefault(name, _acl_set(name, family, allow))
            rules.append([_nfproto(family), _match(_saddr(family), f"@{name}", "!="), *reject])
        else:  # an allow list of the other family only: nobody of this family is allowed
            rules.append([_nfproto(family), *reject])
    return rules


def timeout_object(transport: str, seconds: int) -> tuple[str, Json]:
    """The conntrack timeout policy for an idle timeout: its name and nftables body."""
    if transport == "tcp":
        policy = {"established": seconds}
    else:
        policy = {"unreplied": seconds, "replied": seconds}
    return f"{transport}_{seconds}", {"protocol": transport, "l3proto": "inet", "policy": policy}


def _dnat(route: KernelRoute, family: IPFamily) -> list[Json] | None:
    version = 4 if family == "ipv4" else 6
    backends = [
        b for b in route.spec.backends if ipaddress.ip_address(b.host).version == version
    ]
    if not backends:
        return None
    head = [_nfproto(family), _match(_meta("l4proto"), route.key.transport)]
    if len(backends) == 1:
        target: Json = {"family": IP[family], "addr": backends[0].host, "port": backends[0].port}
        return [*head, {"dnat": target}]
    pool = [[i, {"concat": [b.host, b.port]}] for i, b in enumerate(backends)]
    selector: Json
    if route.spec.options.load_balance == "source_hash":
        selector = {"jhash": {"mod": len(pool), "seed": HASH_SEED, "expr": _saddr(family)}}
    else:
        selector = {"numgen": {"mode": "inc", "mod": len(pool), "offset": 0}}
    addr = {"map": {"key": selector, "data": {"set": pool}}}
    return [*head, {"dnat": {"family": IP[family], "addr": addr}}]


def _listen_element(route: KernelRoute, family: IPFamily) -> tuple[str, Json]:
    key = route.key
    verdict = {"goto": {"target": f"r_{route.slot}"}}
    bind = ipaddress.ip_address(key.bind.split("%", 1)[0])
    digit = family[-1]
    if bind.is_unspecified:
        return f"wild{digit}", [{"concat": [key.transport, key.port]}, verdict]
    return f"bind{digit}", [{"concat": [key.transport, str(bind), key.port]}, verdict]


def base_chains(*, localnet_guard: bool) -> dict[str, Chain]:
    """The hooked chains and the listen lookup, which do not depend on the routes."""
    count = [{"counter": {"map": {"key": {"concat": [_ct("mark"), _ct("direction")]},
                                  "data": "@ctr"}}}]
    new_flow = [_match(_ct("state"), "new", "in"), {"jump": {"target": "new"}}]
    pre: list[tuple[Json, ...]] = [(_match(_meta("iif"), "lo"), RETURN)]
    if localnet_guard:
        loopback = {"prefix": {"addr": "127.0.0.0", "len": 8}}
        pre.append((_match({"payload": {"protocol": "ip", "field": "daddr"}}, loopback),
                    {"drop": None}))
    pre += [tuple(new_flow), tuple(count)]
    lookup: list[tuple[Json, ...]] = [(OUR_MARK, RETURN)]
    for family in ("ipv4", "ipv6"):
        proto, dport = _meta("l4proto"), {"payload": {"protocol": "th", "field": "dport"}}
        daddr = {"payload": {"protocol": IP[family], "field": "daddr"}}
        digit = family[-1]
        lookup.append((_match(_meta("nfproto"), family),
                       {"vmap": {"key": {"concat": [proto, daddr, dport]},
                                 "data": f"@bind{digit}"}}))
        local = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
        lookup.append((_match(_meta("nfproto"), family), local,
                       {"vmap": {"key": {"concat": [proto, dport]}, "data": f"@wild{digit}"}}))
    nat = ((({"vmap": {"key": _ct("mark"), "data": "@nat"}}),),)
    hairpin = (OUR_MARK,
               _match({"payload": {"protocol": "ip", "field": "saddr"}},
                      {"prefix": {"addr": "127.0.0.0", "len": 8}}),
               _match(_meta("oif"), "lo", "!="), {"masquerade": None})
    post = ((_match(_ct("mark"), "@masq"), {"masquerade": None}), hairpin)
    chains = [
        Chain("pre", tuple(pre), ("filter", "prerouting", -150)),
        Chain("out", (tuple(new_flow), tuple(count)), ("filter", "output", -150)),
        Chain("new", tuple(lookup)),
        Chain("prenat", nat, ("nat", "prerouting", -100)),
        Chain("outnat", nat, ("nat", "output", -100)),
        Chain("postnat", post, ("nat", "postrouting", 100)),
    ]
    return {chain.name: chain for chain in chains}


def _route_objects(route: KernelRoute, policy: EdgePolicy, table: _Builder) -> None:
    n, transport = route.slot, route.key.transport
    refuse = _refuse(transport)
    names = {kind: f"{kind}_{n}" for kind in ("new", "in", "out", "acl", "lim", "nob")}
    table.counters.update(names.values())
    rules: list[list[Json]] = []
    if transport == "tcp":
        flags = {"payload": {"protocol": "tcp", "field": "flags"}}
        rules.append([_match(_meta("l4proto"), "tcp"),
                      _match({"&": [flags, ["fin", "syn", "rst", "ack"]]}, "syn", "!="),
                      {"reject": {"type": "tcp reset"}}])
    for suffix, allow, deny in (("g", policy.allow, policy.deny),
                                (f"_{n}", route.spec.options.allow, route.spec.options.deny)):
        rules += _acl_rules(table.sets, suffix=suffix, allow=allow, deny=deny,
                            families=route.families, refuse=refuse, counter=names["acl"])
    if not route.spec.backends:
        rules.append([{"counter": names["nob"]}, refuse])
    if route.limit is not None:
        limit_chain = f"l_{n}_{route.limit}"
        table.chains[limit_chain] = Chain(limit_chain, (
            ({"ct count": {"val": route.limit, "inv": True}}, {"counter": names["lim"]}, refuse),
        ))
        rules.append([{"jump": {"target": limit_chain}}])
    rules.append([{"mangle": {"key": _ct("mark"), "value": route.mark}}])
    if route.idle_timeout is not None:
        name, body = timeout_object(transport, route.idle_timeout)
        table.timeouts[name] = body
        rules.append([{"ct timeout": name}])
    rules.append([{"counter": names["new"]}])
    table.chains[f"r_{n}"] = Chain(f"r_{n}", tuple(tuple(rule) for rule in rules))
    dnat = [rule for rule in (_dnat(route, f) for f in route.families) if rule is not None]
    table.chains[f"n_{n}"] = Chain(f"n_{n}", tuple(tuple(rule) for rule in dnat))
    for family in route.families:
        map_name, element = _listen_element(route, family)
        table.element(map_name, element)
    table.element("nat", [route.mark, {"goto": {"target": f"n_{n}"}}])
    table.element("ctr", [{"concat": [route.mark, "original"]}, names["in"]])
    table.element("ctr", [{"concat": [route.mark, "reply"]}, names["out"]])
    table.element(ROUTES_SET, {"elem": {"val": n, "comment": route.identity}})
    if route.masquerade:
        table.element("masq", route.mark)


class _Builder:
    """Mutable scratch space while `build` assembles a `Table`."""

    def __init__(self) -> None:
        self.chains: dict[str, Chain] = {}
        self.sets: dict[str, NamedSet] = {}
        self.counters: set[str] = set()
        self.timeouts: dict[str, Json] = {}
        self.members: dict[str, dict[str, Json]] = {}

    def element(self, set_name: str, element: Json) -> None:
        key = element[0] if isinstance(element, list) else element
        if isinstance(key, dict) and "elem" in key:
            key = key["elem"]["val"]
        self.members.setdefault(set_name, {})[element_key(key)] = element


def empty_maps() -> dict[str, NamedSet]:
    """The maps and sets every table has, without elements."""
    proto, port = "inet_proto", "inet_service"
    maps = [
        NamedSet("bind4", (proto, "ipv4_addr", port), data="verdict"),
        NamedSet("bind6", (proto, "ipv6_addr", port), data="verdict"),
        NamedSet("wild4", (proto, port), data="verdict"),
        NamedSet("wild6", (proto, port), data="verdict"),
        NamedSet("nat", "mark", data="verdict"),
        NamedSet("ctr", ("mark", "ct_dir"), data="counter"),
        NamedSet("masq", "mark"),
        NamedSet(ROUTES_SET, "mark"),
    ]
    return {m.name: m for m in maps}


def build(
    routes: Iterable[KernelRoute],
    *,
    policy: EdgePolicy,
    localnet_guard: bool,
    localnet_owned: bool = False,
) -> Table:
    """The whole table that forwards `routes` (pure; see the module docstring).

    `localnet_guard` installs the martian guard; `localnet_owned` records in the registry
    (slot 0) that labelproxy switched route_localnet on, so a successor switches it off.
    """
    table = _Builder()
    if localnet_owned:
        table.element(ROUTES_SET, {"elem": {"val": 0, "comment": LOCALNET_NOTE}})
    table.chains.update(base_chains(localnet_guard=localnet_guard))
    for route in sorted(routes, key=lambda r: r.slot):
        _route_objects(route, policy, table)
    sets = empty_maps()
    for name, members in table.members.items():
        base = sets[name]
        sets[name] = NamedSet(base.name, base.type, base.flags, base.data, members)
    sets.update(table.sets)
    return Table(chains=table.chains, sets=sets, counters=frozenset(table.counters),
                 timeouts=table.timeouts)
