"""Small builders of nftables JSON expressions and statements (pure).

Only what the ruleset uses: meta/ct/payload keys, matches, set lookups, refusals.
"""

from __future__ import annotations

import ipaddress
import logging

from labelproxy.kernel.eligible import IPFamily
from labelproxy.kernel.model import MARK_BASE, Json
from labelproxy.spec import IPNetwork

logger = logging.getLogger(__name__)

IP = {"ipv4": "ip", "ipv6": "ip6"}
ADDR_TYPE = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}
RETURN: Json = {"return": None}
DROP: Json = {"drop": None}
MASQUERADE: Json = {"masquerade": None}


def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def ct(key: str) -> Json:
    return {"ct": {"key": key}}


def payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def saddr(family: IPFamily) -> Json:
    return payload(IP[family], "saddr")


def match(left: Json, right: Json, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def nfproto(family: IPFamily) -> Json:
    return match(meta("nfproto"), family)


def l4proto(transport: str) -> Json:
    return match(meta("l4proto"), transport)


def counted(set_name: str) -> Json:
    """`ct mark @SET`: matches labelproxy's flows and counts into the mark's element."""
    return match(ct("mark"), f"@{set_name}")


def refuse(transport: str) -> Json:
    """TCP: a reset (the client sees "connection refused"); UDP: a silent drop."""
    return {"reject": {"type": "tcp reset"}} if transport == "tcp" else DROP


def prefix(net: IPNetwork | str) -> Json:
    net = ipaddress.ip_network(net) if isinstance(net, str) else net
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


OUR_MARK = match(ct("mark"), {"prefix": {"addr": MARK_BASE, "len": 16}})
