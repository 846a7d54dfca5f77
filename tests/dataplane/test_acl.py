"""ACL: allow/deny tables for IPv4, IPv6 and IPv4-mapped clients, and end-to-end denials
where the upstream never sees the refused client."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from labelproxy.spec import EdgePolicy
from labelproxy.streams.acl import Acl, LayeredAcl
from tests.support.tcp import (
    connect,
    ping,
    recv_until_eof,
    running_route,
    tcp_spec,
    upstream,
    wait_for,
)


def nets(*cidrs: str) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize(
    ("allow", "deny", "client", "permitted"),
    [
        ((), (), "203.0.113.7", True),
        (("10.0.0.0/8",), (), "10.1.2.3", True),
        (("10.0.0.0/8",), (), "11.1.2.3", False),
        (("10.0.0.0/8",), ("10.9.0.0/16",), "10.9.1.1", False),  # deny wins
        ((), ("192.0.2.0/24",), "192.0.2.55", False),
        ((), ("192.0.2.0/24",), "192.0.3.1", True),
        (("2001:db8::/32",), (), "2001:db8::1", True),
        (("2001:db8::/32",), (), "2001:db9::1", False),
        ((), ("2001:db8:1::/48",), "2001:db8:1::5", False),
        (("10.0.0.0/8",), (), "::ffff:10.0.0.1", True),  # mapped matches IPv4 rules
        ((), ("10.0.0.0/8",), "::ffff:10.0.0.1", False),
        (("10.0.0.0/8",), (), "2001:db8::1", False),  # an IPv6 client fails an IPv4 allow
        (("::/0",), (), "10.0.0.1", False),
        (("10.0.0.0/8",), (), "fe80::1%eth0", False),
        (("fe80::/10",), (), "fe80::1%eth0", True),  # zone id ignored
        (("10.0.0.0/8",), (), "not-an-ip", False),
    ],
)
def test_acl_table(
    allow: tuple[str, ...], deny: tuple[str, ...], client: str, permitted: bool
) -> None:
    assert Acl(nets(*allow), nets(*deny)).permits(client) is permitted


def test_route_rules_narrow_the_global_ones() -> None:
    acl = LayeredAcl(Acl(nets("10.0.0.0/8")), Acl(nets("10.1.0.0/16")))
    assert acl.permits("10.1.2.3")
    assert not acl.permits("10.2.0.1")  # global allows, route does not
    assert not acl.permits("192.0.2.1")
    assert LayeredAcl(Acl(), Acl()).permits_all


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": True})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("scheme", "bind", "host", "rule"),
    [
        ("tcp4", "127.0.0.1", "127.0.0.1", "127.0.0.0/8"),
        ("tcp6", "::1", "::1", "::1/128"),
        ("tcp", "::", "127.0.0.1", "127.0.0.1/32"),  # dual stack: a mapped client, IPv4 rule
    ],
)
async def test_denied_client_is_closed_before_any_dial(
    scheme: str, bind: str, host: str, rule: str
) -> None:
    async with upstream() as up:
        spec = tcp_spec(up.port, scheme=scheme, bind=bind, deny=nets(rule))  # type: ignore[arg-type]
        async with running_route(spec) as live:
            stream = await connect(live, host=host)
            async with stream:
                assert await recv_until_eof(stream) == b""
            await wait_for(lambda: live.counters.rejected["acl"] == 1)
            assert up.peers == []  # the upstream saw no connection at all
            assert live.counters.connections_total == 0


@pytest.mark.anyio
async def test_global_deny_and_route_allow() -> None:
    async with upstream() as up:
        edge = EdgePolicy(deny=nets("127.0.0.9/32"))
        spec = tcp_spec(up.port, allow=nets("127.0.0.0/24"))
        async with running_route(spec, edge) as live:
            ok = await connect(live, local_host="127.0.0.8")
            async with ok:
                assert await ping(ok) == b"ping"
            for src in ("127.0.0.9", "127.0.1.1"):  # global deny; outside the route allow
                bad = await connect(live, local_host=src)
                async with bad:
                    assert await recv_until_eof(bad) == b""
            await wait_for(lambda: live.counters.rejected["acl"] == 2)
            assert [p[0] for p in up.peers] == ["127.0.0.1"]
