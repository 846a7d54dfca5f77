"""Which routes the kernel carries, and the reason when it does not (pure table tests)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest

from labelproxy.kernel.eligible import eligible
from labelproxy.spec import (
    Backend,
    EdgePolicy,
    ListenKey,
    RouteOptions,
    RouteSpec,
    default_bind,
    transport_of,
)


@dataclass(frozen=True, slots=True)
class LaterOptions(RouteOptions):
    """RouteOptions as a later stage may grow them."""

    wake: bool = False


def spec(scheme: str = "tcp", backends: tuple[str, ...] = ("127.0.0.1",), bind: str = "",
         options: RouteOptions | None = None) -> RouteSpec:
    return RouteSpec(
        alias="web", scheme=scheme,  # type: ignore[arg-type]
        key=ListenKey(transport_of(scheme), bind or default_bind(scheme), 80),  # type: ignore[arg-type]
        backends=tuple(Backend(host, 8080) for host in backends),
        options=options or RouteOptions(),
    )


KERNEL: list[tuple[str, RouteSpec, tuple[str, ...], tuple[str, ...]]] = [
    ("dual-stack listener, IPv4 backend: IPv4 clients in the kernel, IPv6 ones left over",
     spec(), ("ipv4",), ("ipv6",)),
    ("tcp4 on 0.0.0.0", spec("tcp4"), ("ipv4",), ()),
    ("udp6 to an IPv6 backend", spec("udp6", ("2001:db8::5",)), ("ipv6",), ()),
    ("dual-stack with backends of both families", spec("udp", ("127.0.0.1", "2001:db8::5")),
     ("ipv4", "ipv6"), ()),
    ("a bind address", spec("tcp", bind="192.0.2.1"), ("ipv4",), ()),
    ("no backend: refused in the kernel", spec("tcp", ()), ("ipv4", "ipv6"), ()),
    ("::1 backend behind a ::1 bind (local clients only)",
     spec("tcp6", ("::1",), bind="::1"), ("ipv6",), ()),
    ("ACL, cap, idle timeout, source_hash, connect_timeout",
     spec("tcp4", options=RouteOptions(
         allow=(ipaddress.ip_network("192.0.2.0/24"),), deny=(ipaddress.ip_network("::/0"),),
         max_connections=5, idle_timeout=90, connect_timeout=1, load_balance="source_hash")),
     ("ipv4",), ()),
    ("a later option left at its default", spec("tcp4", options=LaterOptions()), ("ipv4",), ()),
]


@pytest.mark.parametrize(("case", "route", "families", "uncovered"), KERNEL,
                         ids=[case for case, *_ in KERNEL])
def test_carried_by_the_kernel(case: str, route: RouteSpec, families: tuple[str, ...],
                               uncovered: tuple[str, ...]) -> None:
    verdict = eligible(route, policy=EdgePolicy())
    assert (verdict.kernel, verdict.reason) == (True, "")
    assert (verdict.families, verdict.uncovered) == (families, uncovered)


RELAY: list[tuple[str, RouteSpec, dict[str, Any], str]] = [
    ("PROXY header upstream", spec(options=RouteOptions(proxy_protocol="v2")), {},
     "proxy_protocol v2 writes a header upstream"),
    ("PROXY header from clients", spec(), {"accept_proxy_protocol": "optional"},
     "LABELPROXY_ACCEPT_PROXY_PROTOCOL=optional reads a header from clients"),
    ("least_conn", spec(options=RouteOptions(load_balance="least_conn")), {},
     "load_balance least_conn needs per-connection state"),
    ("a host name", spec(backends=("db.internal",)), {},
     "backend db.internal is a host name; the kernel needs an address"),
    ("IPv6 loopback behind a wildcard", spec("tcp6", ("::1",)), {},
     "backend [::1]:8080 is IPv6 loopback: forwarded packets cannot reach it"),
    ("IPv4 listener, IPv6 backends only", spec("tcp4", ("2001:db8::5",)), {},
     "listens on ipv4 but its backends ([2001:db8::5]:8080) are of the other address family"),
    ("IPv4-mapped bind", spec("tcp6", bind="::ffff:192.0.2.1"), {},
     "bind ::ffff:192.0.2.1 is an IPv4-mapped IPv6 address"),
    ("an option the kernel does not know", spec(options=LaterOptions(wake=True)), {},
     "option wake=True needs the relay"),
    ("forwarding: relay", spec(options=RouteOptions(forwarding="relay")), {},
     "forwarding: relay asked for by the route"),
]


@pytest.mark.parametrize(("case", "route", "policy", "reason"), RELAY,
                         ids=[case for case, *_ in RELAY])
def test_left_to_the_relay_with_a_reason(case: str, route: RouteSpec, policy: dict[str, Any],
                                         reason: str) -> None:
    verdict = eligible(route, policy=EdgePolicy(**policy))
    assert (verdict.kernel, verdict.reason) == (False, reason)
