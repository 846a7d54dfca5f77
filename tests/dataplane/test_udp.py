"""UDP data plane, relay behaviour: echo per client, whole large datagrams, idle expiry, the
drain of a closed route, stop.

Real loopback sockets and a UDP upstream owned by the test; every route runs `serve_udp`.
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest

from labelproxy.metrics import Metrics
from labelproxy.spec import EdgePolicy
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.udp.server import serve_udp
from tests.support.udp import (  # anyio_backend, relay_path: fixtures for every test
    access_log,
    anyio_backend,  # noqa: F401
    ask,
    client_of,
    relay_path,  # noqa: F401
    running_route,
    udp_spec,
    udp_upstream,
)

pytestmark = pytest.mark.anyio

DRAIN = 30.0  # a drain deadline no test waits for


async def test_each_client_gets_only_its_own_replies_and_counters_match() -> None:
    async with udp_upstream() as up, running_route(udp_spec(up.port)) as live:
        clients = 4
        rounds = 5
        sizes = 0

        async def talk(i: int) -> None:
            nonlocal sizes
            async with client_of(live) as client:
                for r in range(rounds):
                    payload = f"client {i} round {r} ".encode() * (i + 1)
                    assert await ask(client, payload) == payload
                    sizes += len(payload)

        async with anyio.create_task_group() as tg:
            for i in range(clients):
                tg.start_soon(talk, i)

        c = live.counters
        assert c.udp_datagrams_in == c.udp_datagrams_out == clients * rounds
        assert c.bytes_in == c.bytes_out == sizes
        assert c.udp_sessions_active == clients
        # one upstream source (connected socket) per client
        assert len(up.sources()) == clients


@pytest.mark.parametrize("size", [65_000, 65_507])
async def test_largest_ipv4_datagram_arrives_whole_both_ways(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    async with udp_upstream() as up, running_route(udp_spec(up.port)) as live:
        async with client_of(live) as client:
            assert await ask(client, payload) == payload
        assert up.received[0][0] == payload
        assert live.counters.bytes_in == live.counters.bytes_out == size


async def test_large_datagram_over_ipv6_loopback() -> None:
    payload = b"\x5a" * 65_000
    async with udp_upstream("::1") as up:
        spec = udp_spec(up.port, bind="::1", scheme="udp6", backend_host="::1")
        async with running_route(spec) as live, client_of(live) as client:
            assert await ask(client, payload) == payload
            assert up.received[0][0] == payload


async def test_dual_stack_listener_serves_ipv4_and_ipv6_clients() -> None:
    async with udp_upstream() as up:
        spec = udp_spec(up.port, bind="::", scheme="udp")
        async with running_route(spec) as live:
            for remote in ("127.0.0.1", "::1"):
                async with client_of(live, remote_host=remote) as client:
                    assert await ask(client, remote.encode()) == remote.encode()
            assert live.counters.udp_sessions_active == 2


async def test_idle_session_expires_and_next_datagram_opens_a_new_one() -> None:
    async with (
        access_log() as log,
        udp_upstream() as up,
        running_route(udp_spec(up.port, idle_timeout=0.3)) as live,
        client_of(live) as client,
    ):
        assert await ask(client, b"one") == b"one"
        await log.wait_closed(reason="idle")
        assert live.counters.udp_sessions_active == 0
        record = log.closed("idle")[0]
        assert (record.bytes_in, record.bytes_out) == (3, 3)  # type: ignore[attr-defined]
        assert await ask(client, b"two") == b"two"
        assert live.counters.udp_sessions_active == 1
        # a new session dials from a new upstream socket
        assert up.received[0][1] != up.received[1][1]


async def test_traffic_in_either_direction_keeps_the_session() -> None:
    idle = 1.0
    async with (
        access_log() as log,
        udp_upstream(echo=False) as up,
        running_route(udp_spec(up.port, idle_timeout=idle)) as live,
        client_of(live) as client,
    ):
        # client -> upstream only, for longer than the idle timeout
        for _ in range(5):
            await client.send(b"ping")
            await anyio.sleep(idle / 4)
        await up.wait_for(5)
        assert log.closed() == []
        # upstream -> client only (pushed to the session's upstream socket), as long again
        session_source = up.received[0][1]
        assert up.sources() == {session_source}
        for i in range(5):
            await up.sock.sendto(b"push %d" % i, *session_source)
            with anyio.fail_after(5):
                assert await client.receive() == b"push %d" % i
            await anyio.sleep(idle / 4)
        assert log.closed() == []
        assert live.counters.udp_sessions_active == 1
        await log.wait_closed(reason="idle")


async def test_close_without_drain_ends_sessions_and_frees_the_port() -> None:
    async with access_log() as log, udp_upstream() as up:
        async with running_route(udp_spec(up.port)) as live, client_of(live) as client:
            assert await ask(client, b"hi") == b"hi"
            port = live.bound[0][1]
            live.close(0)
            with anyio.fail_after(5):
                await live.listener_closed.wait()
                await live.finished.wait()
            assert live.counters.udp_sessions_active == 0
            reasons = [r.reason for r in log.closed()]  # type: ignore[attr-defined]
            assert reasons == ["drain_timeout"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("idle_timeout", "shorter_drain", "reason"),
    [
        (0.5, None, "idle"),  # the session ends when idle, long before the drain deadline
        (60.0, 0.2, "drain_timeout"),  # a shorter drain timeout ends the drain in progress
    ],
)
async def test_a_closed_route_drains_its_session_and_takes_no_new_source(
    idle_timeout: float, shorter_drain: float | None, reason: str
) -> None:
    async with (
        access_log() as log,
        udp_upstream() as up,
        running_route(udp_spec(up.port, idle_timeout=idle_timeout)) as live,
        client_of(live) as old,
        client_of(live) as new,
    ):
        assert await ask(old, b"before") == b"before"
        port = live.bound[0][1]
        live.close(DRAIN)
        with anyio.fail_after(5):
            await live.stopped_admitting.wait()
        await new.send(b"new source")  # dropped: no session for a new source any more
        assert await ask(old, b"draining") == b"draining"  # after it, on the same socket
        assert [data for data, _ in up.received] == [b"before", b"draining"]
        assert not live.listener_closed.is_set()  # bound: the replies leave through it
        if shorter_drain is not None:
            live.close(shorter_drain)
        with anyio.fail_after(5):
            await live.finished.wait()
        assert [r.reason for r in log.closed()] == [reason]  # type: ignore[attr-defined]
        assert live.listener_closed.is_set()
        assert live.counters.udp_sessions_active == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", port))


async def test_outside_cancellation_closes_everything() -> None:
    async with access_log() as log, udp_upstream() as up:
        spec = udp_spec(up.port)
        live = LiveRoute(spec, counters=Metrics().route("echo", spec.key), edge=EdgePolicy())
        async with anyio.create_task_group() as tg:
            await tg.start(serve_udp, live)
            async with client_of(live) as client:
                assert await ask(client, b"hi") == b"hi"
            tg.cancel_scope.cancel()
        assert live.listener_closed.is_set()
        assert live.finished.is_set()
        assert live.counters.udp_sessions_active == 0
        assert [r.reason for r in log.closed()] == ["cancelled"]  # type: ignore[attr-defined]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(live.bound[0])


async def test_bind_failure_raises_before_started() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        spec = udp_spec(1, port=taken)
        live = LiveRoute(spec, counters=Metrics().route("echo", spec.key), edge=EdgePolicy())
        async with anyio.create_task_group() as tg:
            with pytest.raises(OSError):
                await tg.start(serve_udp, live)
        assert live.bound == []


async def test_backend_by_host_name_is_resolved_and_early_datagrams_wait_for_it() -> None:
    async with udp_upstream("::") as up:  # dual-stack: whichever address localhost gives
        spec = udp_spec(up.port, backend_host="localhost")
        async with running_route(spec) as live, client_of(live) as client:
            for i in range(3):  # sent before the name is resolved: they wait, in order
                await client.send(b"early %d" % i)
            with anyio.fail_after(5):
                replies = [await client.receive() for _ in range(3)]
            assert replies == [b"early 0", b"early 1", b"early 2"]
            assert await ask(client, b"later") == b"later"
            assert live.counters.udp_datagrams_in == live.counters.udp_datagrams_out == 4


@pytest.mark.parametrize(("scheme", "ipv4_port_taken"), [("udp6", False), ("udp", True)])
async def test_ipv6_listener_is_v6_only_and_dual_stack_takes_ipv4_too(
    scheme: Any, ipv4_port_taken: bool
) -> None:
    async with running_route(udp_spec(1, bind="::", scheme=scheme)) as live:
        port = live.bound[0][1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4:
            if ipv4_port_taken:
                with pytest.raises(OSError):
                    v4.bind(("127.0.0.1", port))
            else:
                v4.bind(("127.0.0.1", port))
