"""The table labelproxy wants and the transactions that get it there (pure table tests).

Rules are shown in a compact nft-like spelling (`render`) so each case reads like the ruleset.
Whether the kernel accepts them is proved by the namespace tests (test_kernel_forwarding.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest

from labelproxy.kernel.model import Chain, KernelRoute, Table
from labelproxy.kernel.nft import parse_listing
from labelproxy.kernel.routerules import chain_digest
from labelproxy.kernel.ruleset import build
from labelproxy.kernel.transaction import transaction
from labelproxy.spec import Backend, EdgePolicy, ListenKey, RouteOptions, RouteSpec

Json = Any


def render(value: Json) -> str:
    """Our nftables JSON in a short spelling close to nft's own."""
    if isinstance(value, list | tuple):
        return " ".join(render(v) for v in value)
    if not isinstance(value, dict):
        return str(value)
    (kind, body), = value.items()
    if kind == "match":
        op = "" if body["op"] in ("==", "in") else f"{body['op']} "
        return f"{render(body['left'])} {op}{render(body['right'])}"
    simple: dict[str, Callable[[Any], str]] = {
              "meta": lambda b: b["key"], "ct": lambda b: f"ct {b['key']}",
              "payload": lambda b: f"{b['protocol']} {b['field']}",
              "prefix": lambda b: f"{b['addr']}/{b['len']}",
              "concat": lambda b: " . ".join(render(v) for v in b),
              "mangle": lambda b: f"{render(b['key'])} set {b['value']:#x}",
              "ct timeout": lambda b: f"ct timeout set {b}",
              "ct count": lambda b: f"ct count over {b['val']}",
              "reject": lambda b: "reset", "drop": lambda b: "drop",
              "jhash": lambda b: f"jhash {render(b['expr'])} mod {b['mod']}",
              "numgen": lambda b: f"numgen inc mod {b['mod']}",
              "set": lambda b: "{ " + ", ".join(f"{k}: {render(v)}" for k, v in b) + " }",
              "map": lambda b: f"{render(b['key'])} map {render(b['data'])}"}
    if kind in simple:
        return str(simple[kind](body))
    if kind == "dnat":
        port = f":{body['port']}" if "port" in body else ""
        return f"dnat to {render(body['addr'])}{port}"
    raise AssertionError(f"no spelling for {value}")


def route(slot: int = 1, *, port: int = 80, scheme: str = "tcp4", backends: str = "127.0.0.1",
          alias: str = "web", **kwargs: Any) -> KernelRoute:
    options = kwargs.pop("options", {})
    for name in ("allow", "deny"):
        options[name] = tuple(ipaddress.ip_network(n) for n in options.get(name, ()))
    bind = kwargs.pop("bind", "0.0.0.0")
    spec = RouteSpec(alias=alias, scheme=scheme,  # type: ignore[arg-type]
                     key=ListenKey("udp" if scheme.startswith("udp") else "tcp", bind, port),
                     backends=tuple(Backend(h, 8080) for h in backends.split() if h),
                     options=RouteOptions(**options))
    return KernelRoute(spec=spec, slot=slot, families=kwargs.pop("families", ("ipv4",)),
                       **kwargs)


def rules(table: Table, chain: str) -> list[str]:
    return [render(rule) for rule in table.chains[chain].rules or ()]


MARK = "ct mark set 0x4c500001"
ADMISSION = [
    ("plain TCP", route(), {}, [MARK]),
    ("idle timeout and cap (UDP)", route(scheme="udp4", idle_timeout=300, limit=10_000), {},
     [f"{MARK} ct timeout set udp_300", "ct count over 10000 ct mark @lim drop"]),
    ("route deny", route(options={"deny": ["192.0.2.2/32"]}), {},
     [MARK, "nfproto ipv4 ip saddr @d4_1 ct mark @acl reset"]),
    ("route allow of the other family only", route(options={"allow": ["2001:db8::/32"]}), {},
     [MARK, "nfproto ipv4 ct mark @acl reset"]),
    ("global ACL before the route's, deny before allow",
     route(options={"allow": ["192.0.2.0/24"]}, limit=5),
     {"deny": (ipaddress.ip_network("192.0.2.9/32"),)},
     [MARK, "nfproto ipv4 ip saddr @d4g ct mark @acl reset",
      "nfproto ipv4 ip saddr != @a4_1 ct mark @acl reset", "ct count over 5 ct mark @lim reset"]),
]


@pytest.mark.parametrize(("case", "kroute", "policy", "expected"), ADMISSION,
                         ids=[case for case, *_ in ADMISSION])
def test_admission_chain(case: str, kroute: KernelRoute, policy: dict[str, Any],
                         expected: list[str]) -> None:
    table = build([kroute], policy=EdgePolicy(**policy), localnet_guard=True)
    assert rules(table, "r_1") == expected


NAT = [
    ("one backend", route(), ["nfproto ipv4 l4proto tcp dnat to 127.0.0.1:8080"]),
    ("round robin", route(backends="127.0.0.1 127.0.0.2"),
     ["nfproto ipv4 l4proto tcp dnat to numgen inc mod 2 map "
      "{ 0: 127.0.0.1 . 8080, 1: 127.0.0.2 . 8080 }"]),
    ("source hash", route(backends="127.0.0.1 127.0.0.2",
                          options={"load_balance": "source_hash"}),
     ["nfproto ipv4 l4proto tcp dnat to jhash ip saddr mod 2 map "
      "{ 0: 127.0.0.1 . 8080, 1: 127.0.0.2 . 8080 }"]),
    ("each family to its own backends", route(scheme="udp", bind="::",
                                              backends="127.0.0.1 2001:db8::5",
                                              families=("ipv4", "ipv6")),
     ["nfproto ipv4 l4proto udp dnat to 127.0.0.1:8080",
      "nfproto ipv6 l4proto udp dnat to 2001:db8::5:8080"]),
    ("no backend: nothing to translate", route(backends=""), []),
]


@pytest.mark.parametrize(("case", "kroute", "expected"), NAT, ids=[case for case, *_ in NAT])
def test_nat_chain(case: str, kroute: KernelRoute, expected: list[str]) -> None:
    table = build([kroute], policy=EdgePolicy(), localnet_guard=False)
    assert rules(table, "n_1") == expected


def test_elements_of_a_route() -> None:
    table = build([route(masquerade=True, backends=""),
                   route(2, port=53, scheme="udp", bind="::", families=("ipv4", "ipv6")),
                   route(3, port=443, bind="192.0.2.1")],
                  policy=EdgePolicy(), localnet_guard=True)
    keys = {name: sorted(named.elements) for name, named in table.sets.items()}
    assert keys["wild4"] == ["tcp . 80", "udp . 53"]
    assert keys["wild6"] == ["udp . 53"]
    assert keys["bind4"] == ["tcp . 192.0.2.1 . 443"]
    assert keys["masq"] == keys["empty"] == [str(0x4C500001)]
    assert len(keys["traffic"]) == 6 and len(keys["flows"]) == len(keys["lim"]) == 3
    registry = table.sets["routes_v1"].elements["1"]["elem"]
    assert registry["comment"] == f"{chain_digest(table.chains['r_1'])} tcp://0.0.0.0:80 web"


def test_acl_sets_are_collapsed() -> None:
    table = build([route(options={"allow": ["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/25",
                                            "192.0.2.128/25"]})],
                  policy=EdgePolicy(), localnet_guard=False)
    elements = table.sets["a4_1"].elements.values()
    assert sorted(render(element) for element in elements) == ["10.0.0.0/8", "192.0.2.0/24"]


def commands(old: Table | None, new: Table, **kwargs: Any) -> list[str]:
    """A transaction as `verb kind name` lines (rules as `add rule CHAIN`)."""
    tx = transaction(old, new, **kwargs)
    out = [*tx.prepare]
    for command in tx.commands:
        (verb, body), = command.items()
        (kind, item), = body.items()
        name = item.get("chain") if kind == "rule" else item["name"]
        extra = " " + " ".join(sorted(str(e) for e in item["elem"])) if "elem" in item else ""
        out.append(f"{verb} {kind} {name}{extra}")
    return [*out, *tx.cleanup]


def table_of(*routes: KernelRoute) -> Table:
    return build(routes, policy=EdgePolicy(), localnet_guard=True)


def test_an_unchanged_table_sends_nothing() -> None:
    table = table_of(route(), route(2, port=81))
    tx = transaction(table, table_of(route(), route(2, port=81)))
    assert tx.empty and commands(table, table) == ["add table labelproxy"]


def test_a_backend_change_rewrites_only_the_nat_chain() -> None:
    old = table_of(route(), route(2, port=81))
    new = table_of(route(backends="127.0.0.9"), route(2, port=81))
    assert commands(old, new) == ["add table labelproxy", "flush chain n_1", "add rule n_1"]


def test_a_removed_route_loses_its_references_before_its_chains() -> None:
    old, new = table_of(route(), route(2, port=81, idle_timeout=90)), table_of(route())
    mark = 0x4C500002
    assert commands(old, new) == [
        "add table labelproxy",
        *(f"delete element {name} {mark}" for name in ("acl", "flows", "lim", "nat", "nob")),
        "delete element routes_v1 2",
        f"delete element traffic {{'concat': [{mark}, 'original']}} "
        f"{{'concat': [{mark}, 'reply']}}",
        "delete element wild4 {'concat': ['tcp', 81]}",
        "flush chain n_2", "flush chain r_2", "delete chain n_2", "delete chain r_2",
        "delete ct timeout inet labelproxy tcp_90",
    ]


def test_timeout_policies_are_made_before_and_deleted_after_the_batch() -> None:
    first = commands(None, table_of(route(idle_timeout=90)))
    assert first[:2] == ["add table inet labelproxy",
                         "add ct timeout inet labelproxy tcp_90 { protocol tcp; l3proto inet; "
                         "policy = { established: 90 }; }"]
    gone = commands(table_of(route(idle_timeout=90)), table_of(route()))
    assert gone[-1] == "delete ct timeout inet labelproxy tcp_90"
    assert "flush chain r_1" in gone


def test_an_adopted_table_keeps_counters_and_unchanged_admission_chains() -> None:
    wanted = table_of(route(limit=5), route(2, port=81, limit=5))
    adopted = Table(chains={name: Chain(name, None, c.hook) for name, c in wanted.chains.items()},
                    sets=wanted.sets, timeouts=wanted.timeouts)
    lines = commands(adopted, wanted, known=False, keep=frozenset({"r_1"}))
    assert "flush chain r_2" in lines and "flush chain r_1" not in lines
    assert "flush chain n_1" in lines and "flush chain pre" in lines
    counted = ("traffic", "flows", "nob", "acl", "lim")
    assert not [line for line in lines if line.split()[2:3] and line.split()[2] in counted]
    assert "flush map wild4" in lines and "flush set routes_v1" in lines


def test_a_listing_is_read_back_with_its_registry() -> None:
    listing = [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "inet", "name": "labelproxy"}},
        {"chain": {"family": "inet", "table": "labelproxy", "name": "pre", "type": "filter",
                   "hook": "prerouting", "prio": -150, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "labelproxy", "name": "r_3"}},
        {"set": {"family": "inet", "table": "labelproxy", "name": "routes_v1", "type": "mark",
                 "elem": [{"elem": {"val": 3, "comment": "0123456789ab tcp://0.0.0.0:80 web"}},
                          {"elem": {"val": 0, "comment": "route_localnet switched on"}}]}},
        {"set": {"family": "inet", "table": "labelproxy", "name": "flows", "type": "mark",
                 "elem": [{"elem": {"val": 1280311299,
                                    "counter": {"packets": 4, "bytes": 240}}}],
                 "stmt": [{"counter": None}]}},
        {"ct timeout": {"family": "inet", "table": "labelproxy", "name": "udp_300",
                        "protocol": "udp", "l3proto": "inet",
                        "policy": {"unreplied": 300, "replied": 300}}},
    ]
    adopted = parse_listing(listing)
    assert adopted.routes == {3: "0123456789ab tcp://0.0.0.0:80 web",
                              0: "route_localnet switched on"}
    assert adopted.table.chains["pre"] == Chain("pre", None, ("filter", "prerouting", -150))
    assert adopted.table.chains["r_3"].rules is None
    assert adopted.table.sets["flows"].counter and list(adopted.table.sets["flows"].elements) == [
        "1280311299"]
    assert adopted.table.timeouts["udp_300"]["policy"] == {"unreplied": 300, "replied": 300}
