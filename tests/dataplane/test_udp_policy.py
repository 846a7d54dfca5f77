"""UDP data plane, policy at the edge: session cap, ACL, no backend, PROXY v2 upstream, upstream
errors, and hooks seeing every relayed datagram.

Real loopback sockets and a UDP upstream owned by the test; every route runs `serve_udp`.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import anyio
import pytest
from proxyprotocol.v2 import ProxyProtocolV2

from labelproxy.metrics import Direction
from labelproxy.spec import EdgePolicy
from labelproxy.streams.hooks import BaseHook, ConnInfo
from tests.support.ports import free_port
from tests.support.udp import (  # anyio_backend, relay_path: fixtures for every test
    anyio_backend,  # noqa: F401
    ask,
    client_of,
    relay_path,  # noqa: F401
    running_route,
    udp_spec,
    udp_upstream,
    wait_until,
)

pytestmark = pytest.mark.anyio


async def test_new_sources_beyond_the_cap_are_dropped_and_existing_sessions_keep_working() -> None:
    async with (
        udp_upstream() as up,
        running_route(udp_spec(up.port, max_connections=2)) as live,
        client_of(live) as a,
        client_of(live) as b,
        client_of(live) as c,
    ):
        assert await ask(a, b"a1") == b"a1"
        assert await ask(b, b"b1") == b"b1"
        await c.send(b"c1")
        # the listener handles datagrams in arrival order: once a's reply is back,
        # c's datagram has been dealt with
        assert await ask(a, b"a2") == b"a2"
        assert live.counters.udp_dropped["limit"] == 1
        assert await ask(b, b"b2") == b"b2"
        assert live.counters.udp_sessions_active == 2
        assert b"c1" not in {data for data, _ in up.received}
        assert len(up.sources()) == 2


async def test_acl_denied_source_creates_no_session_and_reaches_nothing() -> None:
    deny = (ipaddress.ip_network("127.0.0.3/32"),)
    async with (
        udp_upstream() as up,
        running_route(udp_spec(up.port, deny=deny)) as live,
        client_of(live, local_host="127.0.0.3") as denied,
        client_of(live, local_host="127.0.0.1") as allowed,
    ):
        await denied.send(b"let me in")
        assert await ask(allowed, b"hello") == b"hello"
        assert live.counters.udp_dropped["acl"] == 1
        assert live.counters.udp_sessions_active == 1
        assert [data for data, _ in up.received] == [b"hello"]


async def test_global_acl_applies_to_udp() -> None:
    edge = EdgePolicy(allow=(ipaddress.ip_network("127.0.0.1/32"),))
    async with (
        udp_upstream() as up,
        running_route(udp_spec(up.port), edge=edge) as live,
        client_of(live, local_host="127.0.0.2") as outsider,
        client_of(live) as insider,
    ):
        await outsider.send(b"x")
        assert await ask(insider, b"y") == b"y"
        assert live.counters.udp_dropped["acl"] == 1
        assert [data for data, _ in up.received] == [b"y"]


async def test_no_backend_drops_and_counts() -> None:
    async with running_route(udp_spec(None)) as live, client_of(live) as client:
        for _ in range(3):
            await client.send(b"anyone?")
        await wait_until(lambda: live.counters.udp_dropped["no_backend"] == 3)
        assert live.counters.udp_sessions_active == 0
        assert live.counters.udp_datagrams_in == 0


def parse_v2(datagram: bytes) -> tuple[Any, bytes]:
    """Parse a PROXY v2 datagram with the proxy-protocol package: (result, payload)."""
    pp = ProxyProtocolV2()
    header = pp.unpack_header(datagram[:16])
    end = 16 + header.data_len
    return pp.unpack_data(header, datagram[:16], datagram[16:end]), datagram[end:]


@pytest.mark.parametrize(
    ("bind", "scheme", "client_host"),
    [("127.0.0.1", "udp4", "127.0.0.1"), ("::", "udp", "127.0.0.1"), ("::1", "udp6", "::1")],
)
async def test_proxy_v2_header_carries_the_real_client_on_every_datagram(
    bind: str, scheme: Any, client_host: str
) -> None:
    async with udp_upstream(strip_proxy=True) as up:
        spec = udp_spec(up.port, bind=bind, scheme=scheme, proxy_protocol="v2")
        async with running_route(spec) as live, client_of(live, remote_host=client_host) as client:
            local = client.extra(anyio.abc.SocketAttribute.local_address)
            for payload in (b"first", b"second" * 1000):
                assert await ask(client, payload) == payload
            listen_port = live.bound[0][1]
    assert len(up.received) == 2
    for (datagram, _), payload in zip(up.received, (b"first", b"second" * 1000), strict=True):
        result, rest = parse_v2(datagram)
        assert rest == payload
        assert result.protocol == socket.SOCK_DGRAM
        assert result.source == (ipaddress.ip_address(client_host), local[1])
        assert result.dest == (ipaddress.ip_address(client_host), listen_port)


async def test_refused_upstream_is_counted_and_the_listener_and_session_survive() -> None:
    dead_port = free_port(socket.SOCK_DGRAM)
    async with running_route(udp_spec(dead_port)) as live, client_of(live) as client:
        await client.send(b"nobody home")
        await wait_until(lambda: live.counters.udp_dropped["upstream_error"] >= 1)
        assert live.counters.udp_sessions_active == 1
        # the backend comes up on that port: the same session now gets replies
        async with udp_upstream(port=dead_port) as up:
            assert await ask(client, b"now?") == b"now?"
            assert live.counters.udp_sessions_active == 1
            assert up.received[-1][0] == b"now?"


class SizeHook(BaseHook):
    """A policy plugged in as a hook: sees the size of every relayed datagram."""

    def __init__(self) -> None:
        self.sizes: dict[Direction, int] = {"in": 0, "out": 0}
        self.opened = 0
        self.closed = 0

    def on_open(self, conn: ConnInfo) -> None:
        self.opened += 1

    def on_chunk(self, conn: ConnInfo, direction: Direction, nbytes: int) -> None:
        self.sizes[direction] += nbytes

    def on_close(self, conn: ConnInfo) -> None:
        self.closed += 1


async def test_hooks_see_every_datagram_with_the_counters_totals() -> None:
    hook = SizeHook()
    async with udp_upstream() as up:
        async with running_route(udp_spec(up.port), extra_hooks=(hook,)) as live:
            async with client_of(live) as a, client_of(live) as b:
                for i in range(20):
                    assert await ask(a if i % 2 else b, b"z" * (i + 1)) == b"z" * (i + 1)
            counters = live.counters
            assert hook.sizes == {"in": counters.bytes_in, "out": counters.bytes_out}
            assert counters.bytes_in == sum(range(1, 21))
        assert (hook.opened, hook.closed) == (2, 2)


async def test_sessions_move_off_a_backend_that_left_the_route() -> None:
    async with (
        udp_upstream() as old,
        udp_upstream() as new,
        running_route(udp_spec(old.port)) as live,
        client_of(live) as client,
    ):
        assert await ask(client, b"to old") == b"to old"
        live.update(udp_spec(new.port))
        assert await ask(client, b"to new") == b"to new"
        assert [d for d, _ in old.received] == [b"to old"]
        assert [d for d, _ in new.received] == [b"to new"]
        assert live.counters.udp_sessions_active == 1
