"""UDP data plane, batches: bursts larger than one recvmmsg, interleaved sources in one batch,
a failure part way through a sendmmsg run, and the raw sockaddr decoding of the batched path.

Every test runs through both relay paths (batched recvmmsg/sendmmsg and per-datagram).
"""

from __future__ import annotations

import os
import socket

import anyio
import pytest

from labelproxy.streams.addresses import unmapped
from labelproxy.streams.udp import mmsg as udp_mmsg
from labelproxy.streams.udp.session import RawRefs
from tests.support.udp import (  # anyio_backend, relay_path: fixtures for every test
    anyio_backend,  # noqa: F401
    client_of,
    relay_path,  # noqa: F401
    running_route,
    strip_proxy_v2,
    udp_spec,
    udp_upstream,
    wait_until,
)

pytestmark = pytest.mark.anyio


async def test_burst_larger_than_a_batch_arrives_in_order_with_exact_counters() -> None:
    count = 3 * udp_mmsg.SLOTS + 7
    payloads = [f"datagram {i:04d}".encode() * (1 + i % 5) for i in range(count)]
    async with udp_upstream() as up, running_route(udp_spec(up.port)) as live:
        async with client_of(live) as client:
            for payload in payloads:  # back to back: the relay sees them in batches
                await client.send(payload)
            got: list[bytes] = []
            with anyio.fail_after(5):
                while len(got) < count:
                    got.append(await client.receive())
        c = live.counters
        assert c.udp_datagrams_in == c.udp_datagrams_out == count
        assert c.bytes_in == c.bytes_out == sum(map(len, payloads))
    assert [data for data, _ in up.received] == payloads
    assert got == payloads


async def test_interleaved_sources_in_one_batch_each_get_their_own_session() -> None:
    clients, rounds = 5, 20
    async with udp_upstream() as up, running_route(udp_spec(up.port)) as live:
        socks = []
        for _ in range(clients):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            socks.append(sock)
        try:
            target = live.bound[0]
            for r in range(rounds):
                for i, sock in enumerate(socks):
                    sock.sendto(f"{i}:{r}".encode(), target)
            await up.wait_for(clients * rounds)
            await wait_until(lambda: live.counters.udp_datagrams_out == clients * rounds)
            for i, sock in enumerate(socks):
                replies = []
                for _ in range(rounds):
                    replies.append(sock.recv(100))
                assert replies == [f"{i}:{r}".encode() for r in range(rounds)]
        finally:
            for sock in socks:
                sock.close()
        assert live.counters.udp_sessions_active == clients
        assert len(up.sources()) == clients
        per_source: dict[tuple[str, int], list[bytes]] = {}
        for data, src in up.received:
            per_source.setdefault(src, []).append(data)
        assert sorted(int(v[0].split(b":")[0]) for v in per_source.values()) == list(range(clients))
        for datagrams in per_source.values():
            head = datagrams[0].split(b":")[0]
            assert datagrams == [head + b":" + str(r).encode() for r in range(rounds)]


async def test_a_datagram_too_large_for_the_header_is_dropped_and_the_rest_of_the_run_passes() -> (
    None
):
    big = b"x" * 65_507  # fits alone, not behind a PROXY v2 header
    burst = [b"one", b"two", big, b"three", b"four"]
    async with udp_upstream(echo=False) as up:
        spec = udp_spec(up.port, proxy_protocol="v2")
        async with running_route(spec) as live, client_of(live) as client:
            for payload in burst:
                await client.send(payload)
            await up.wait_for(4)
            await wait_until(lambda: live.counters.udp_dropped["upstream_error"] == 1)
            c = live.counters
            assert c.udp_datagrams_in == 4
            assert c.bytes_in == sum(len(p) for p in burst if p is not big)
    assert [strip_proxy_v2(data) for data, _ in up.received] == [b"one", b"two", b"three", b"four"]


async def test_one_query_answered_by_a_burst_of_replies_arrives_whole_and_in_order() -> None:
    """The query is read the plain way and its replies queue behind the first: the first
    reply goes out with sendto, the rest in batches to the same client."""
    count = udp_mmsg.SLOTS + 3  # a full batch and more, within the client's receive buffer
    replies = [f"reply {i:04d}".encode() for i in range(count)]
    async with (
        await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1") as server,
        running_route(udp_spec(server.extra(anyio.abc.SocketAttribute.local_port))) as live,
        client_of(live) as client,
    ):
        await client.send(b"zone, please")
        with anyio.fail_after(5):
            query, source = await server.receive()
        assert query == b"zone, please"
        fd = os.dup(server.extra(anyio.abc.SocketAttribute.raw_socket).fileno())
        with socket.socket(fileno=fd) as raw:  # the backend's own address, sent synchronously
            for reply in replies:  # back to back, without yielding: the relay finds a queue
                raw.sendto(reply, source)
        got: list[bytes] = []
        with anyio.fail_after(5):
            while len(got) < count:
                got.append(await client.receive())
        assert got == replies
        await client.send(b"thanks")  # the session still maps this client to its upstream
        with anyio.fail_after(5):
            assert (await server.receive())[0] == b"thanks"
        c = live.counters
        assert (c.udp_datagrams_in, c.udp_datagrams_out) == (2, count)
        assert c.bytes_out == sum(map(len, replies))
        assert c.udp_sessions_active == 1


def test_raw_source_addresses_decode_like_recvfrom() -> None:
    v4 = (socket.AF_INET).to_bytes(2, "little") + (5353).to_bytes(2, "big")
    v4 += socket.inet_pton(socket.AF_INET, "10.1.2.3") + bytes(8)
    assert udp_mmsg.sockaddr_tuple(v4) == ("10.1.2.3", 5353)

    def v6(host: str, port: int, flow: int = 0, scope: int = 0) -> bytes:
        raw = (socket.AF_INET6).to_bytes(2, "little") + port.to_bytes(2, "big")
        raw += flow.to_bytes(4, "big") + socket.inet_pton(socket.AF_INET6, host)
        return raw + scope.to_bytes(4, "little")

    assert udp_mmsg.sockaddr_tuple(v6("2001:db8::7", 53, flow=9)) == ("2001:db8::7", 53, 9, 0)
    mapped = udp_mmsg.sockaddr_tuple(v6("::ffff:192.0.2.1", 4000))
    assert mapped == ("::ffff:192.0.2.1", 4000, 0, 0)
    assert unmapped(mapped[0]) == "192.0.2.1"
    with pytest.raises(ValueError):
        udp_mmsg.sockaddr_tuple(bytes(16))
    for raw in (v4, v6("2001:db8::7", 53, flow=9), v6("fe80::1", 53, scope=3)):
        assert udp_mmsg.sockaddr_raw(udp_mmsg.sockaddr_tuple(raw)) == raw


@pytest.mark.skipif(not udp_mmsg.available(), reason="no recvmmsg/sendmmsg here")
@pytest.mark.parametrize(
    ("server_family", "server_host", "client_family", "client_host"),
    [
        (socket.AF_INET, "127.0.0.1", socket.AF_INET, "127.0.0.1"),
        (socket.AF_INET6, "::", socket.AF_INET, "127.0.0.1"),
        (socket.AF_INET6, "::1", socket.AF_INET6, "::1"),
    ],
)
def test_a_source_seen_by_recvfrom_gets_the_key_recvmmsg_reports(
    server_family: socket.AddressFamily,
    server_host: str,
    client_family: socket.AddressFamily,
    client_host: str,
) -> None:
    """A session opened by a plain recvfrom must be found again by the batched path."""
    arena = udp_mmsg.MmsgArena(slots=2, slot_bytes=256)
    with (
        socket.socket(server_family, socket.SOCK_DGRAM) as server,
        socket.socket(client_family, socket.SOCK_DGRAM) as client,
    ):
        if server_family == socket.AF_INET6:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind((server_host, 0))
        client.bind((client_host, 0))
        target = (
            "::1" if client_family == socket.AF_INET6 else "127.0.0.1",
            server.getsockname()[1],
        )
        client.sendto(b"plain", target)
        client.sendto(b"batched", target)
        server.settimeout(2)
        _, addr = server.recvfrom(64)
        server.setblocking(False)
        assert arena.recv(server.fileno()) == 1
        assert udp_mmsg.sockaddr_raw(addr) == arena.sources(1)[0]


@pytest.mark.skipif(not udp_mmsg.available(), reason="no recvmmsg/sendmmsg here")
def test_arena_receives_names_and_sends_replies_on_real_sockets() -> None:
    arena = udp_mmsg.MmsgArena(slots=4, slot_bytes=2048)
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind(("::", 0))
        server.setblocking(False)
        client.bind(("127.0.0.1", 0))
        assert arena.recv(server.fileno()) == -11  # EAGAIN, nothing waiting
        for payload in (b"a", b"bb", b"ccc"):
            client.sendto(payload, ("127.0.0.1", server.getsockname()[1]))
        n = arena.recv(server.fileno())
        assert n == 3
        assert arena.lengths(n) == [1, 2, 3]
        sources = arena.sources(n)
        assert len(set(sources)) == 1
        host, port = udp_mmsg.sockaddr_tuple(sources[0])[:2]
        assert (unmapped(host), port) == client.getsockname()
        assert bytes(arena.view[2048 : 2048 + 2]) == b"bb"
        refs = RawRefs(sources[0], None)
        assert arena.send_replies(server.fileno(), 1, 2, [2, 3], refs.name) == 2
        client.settimeout(2)
        assert client.recv(10) == b"bb"
        assert client.recv(10) == b"ccc"
