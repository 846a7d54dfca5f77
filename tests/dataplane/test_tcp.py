"""TCP data plane: echo, half-close, big transfers, concurrency, timeouts, byte counters.

Real loopback sockets: a test-owned upstream and `serve_tcp` in the same event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.abc
import pytest

from labelproxy.metrics import Metrics
from labelproxy.spec import EdgePolicy
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.tcp.server import serve_tcp
from tests.support.ports import free_port
from tests.support.tcp import (
    DEADLINE,
    connect,
    ping,
    recv_exactly,
    recv_until_eof,
    running_route,
    tcp_spec,
    upstream,
    wait_for,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"), "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


async def test_echo_and_counters_match_bytes_relayed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="labelproxy.access")
    async with upstream() as up, running_route(tcp_spec(up.port, alias="echo")) as live:
        stream = await connect(live)
        async with stream:
            assert await ping(stream, b"hello") == b"hello"
            assert await ping(stream, b"x" * 100_000) == b"x" * 100_000
            await stream.send_eof()
            assert await recv_until_eof(stream) == b""
        await wait_for(lambda: live.counters.connections_active == 0)
        c = live.counters
        assert (c.bytes_in, c.bytes_out) == (100_005, 100_005)
        assert c.connections_total == 1
        # the access record is written on the data-loop thread right after the connection
        # is released (counters first): wait for it rather than race it
        def access_records() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "labelproxy.access"]

        await wait_for(lambda: bool(access_records()))
        records = access_records()
        assert len(records) == 1
        rec: Any = records[0]
        assert (rec.route, rec.bytes_in, rec.bytes_out, rec.reason) == (
            "echo",
            100_005,
            100_005,
            "eof",
        )
        assert rec.backend == f"127.0.0.1:{up.port}"
        assert rec.client.startswith("127.0.0.1:")


async def test_client_half_close_reaches_upstream_and_reply_still_flows() -> None:
    async def reply_after_eof(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            got = await recv_until_eof(stream)
            await stream.send(b"got:" + got)

    async with upstream(reply_after_eof) as up, running_route(tcp_spec(up.port)) as live:
        stream = await connect(live)
        async with stream:
            await stream.send(b"request")
            await stream.send_eof()
            assert await recv_until_eof(stream) == b"got:request"


async def test_upstream_half_close_reaches_client_and_client_can_still_send() -> None:
    received: list[bytes] = []

    async def greet_then_listen(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.send(b"banner")
            await stream.send_eof()
            received.append(await recv_until_eof(stream))

    async with upstream(greet_then_listen) as up, running_route(tcp_spec(up.port)) as live:
        stream = await connect(live)
        async with stream:
            assert await recv_until_eof(stream) == b"banner"
            await stream.send(b"late data")
            await stream.send_eof()
            await wait_for(lambda: bool(received))
        assert received == [b"late data"]


async def test_100mb_both_ways_sha256_matches() -> None:
    size = 100 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    async with upstream() as up, running_route(tcp_spec(up.port)) as live:
        stream = await connect(live)
        sent, got = hashlib.sha256(), hashlib.sha256()
        nreceived = 0

        async def send_all() -> None:
            for i in range(size // len(block)):
                chunk = block[i % 7 :] + block[: i % 7]
                sent.update(chunk)
                await stream.send(chunk)
            await stream.send_eof()

        async with stream:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send_all)
                    async for chunk in stream:
                        got.update(chunk)
                        nreceived += len(chunk)
        assert nreceived == size
        assert got.hexdigest() == sent.hexdigest()
        await wait_for(lambda: live.counters.connections_active == 0)
        assert live.counters.bytes_in == size
        assert live.counters.bytes_out == size


async def test_500_concurrent_connections_all_echo() -> None:
    async with upstream() as up, running_route(tcp_spec(up.port)) as live:
        results: dict[int, bytes] = {}
        opened = 0
        all_open = anyio.Event()
        release = anyio.Event()

        async def client(i: int) -> None:
            nonlocal opened
            stream = await connect(live)
            async with stream:
                opened += 1
                if opened == 500:
                    all_open.set()
                await release.wait()
                payload = f"client {i} ".encode() * 10
                results[i] = await ping(stream, payload)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(500):
                    tg.start_soon(client, i)
                await all_open.wait()
                await wait_for(lambda: live.counters.connections_active == 500)
                release.set()
        assert all(results[i] == f"client {i} ".encode() * 10 for i in range(500))
        assert live.counters.connections_total == 500


async def test_idle_timeout_closes_an_idle_connection_but_not_a_busy_one() -> None:
    async with upstream() as up, running_route(tcp_spec(up.port, idle_timeout=0.3)) as live:
        idle = await connect(live)
        busy = await connect(live)
        async with idle, busy:
            assert await ping(idle) == b"ping"
            with anyio.fail_after(DEADLINE):
                eof = anyio.Event()

                async def watch_idle() -> None:
                    assert await recv_until_eof(idle) == b""
                    eof.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch_idle)
                    while not eof.is_set():  # keep `busy` busy until `idle` is closed
                        assert await ping(busy) == b"ping"
                        await anyio.sleep(0.05)
            assert await ping(busy) == b"ping"


async def test_refused_backend_closes_client_and_counts_dial_error() -> None:
    async with running_route(tcp_spec(free_port())) as live:
        stream = await connect(live)
        async with stream:
            assert await recv_until_eof(stream) == b""
        c = live.counters
        # each dial counts: the first, and the one more after a short delay (dial.RETRY_DELAY)
        await wait_for(lambda: c.dial_errors == 2 and c.connections_active == 0)


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A loopback port whose listener's accept queue is full: SYNs to it are dropped, so a
    dial to it hangs until its connect timeout."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    try:
        for _ in range(2):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(hole.getsockname())
            fillers.append(s)
        yield int(hole.getsockname()[1])
    finally:
        for s in fillers:
            s.close()
        hole.close()


async def test_connect_timeout_closes_client_and_counts_dial_error() -> None:
    with black_hole() as port:
        async with running_route(tcp_spec(port, connect_timeout=0.3)) as live:
            stream = await connect(live)
            async with stream:
                assert await recv_until_eof(stream) == b""
            await wait_for(lambda: live.counters.dial_errors == 1)


async def test_connect_timeout_fails_over_to_the_next_backend_and_others_are_not_held_up() -> None:
    # the first backend never answers; the second echoes. A dial to the first times out
    # after connect_timeout and goes on to the second, and a client whose dial goes straight
    # to the live backend is not delayed by the other's.
    with black_hole() as hole:
        async with upstream() as up:
            spec = tcp_spec(hole, up.port, connect_timeout=1.0)
            async with running_route(spec) as live:
                slow = await connect(live)  # round robin: picks the black hole first
                fast = await connect(live)  # then the live backend
                async with slow, fast:
                    with anyio.fail_after(0.8):  # inside the other dial's connect timeout
                        assert await ping(fast, b"fast") == b"fast"
                    assert await ping(slow, b"slow") == b"slow"  # after the timeout
                assert live.counters.dial_errors == 1
                assert len(up.peers) == 2


async def test_failover_to_the_next_backend() -> None:
    async with upstream() as up:
        spec = tcp_spec(free_port(), up.port)
        async with running_route(spec) as live:
            for _ in range(3):
                stream = await connect(live)
                async with stream:
                    assert await ping(stream) == b"ping"
            assert len(up.peers) == 3
            assert live.counters.dial_errors >= 1


async def test_no_backend_refuses_and_counts() -> None:
    async with running_route(tcp_spec()) as live:
        stream = await connect(live)
        async with stream:
            assert await recv_until_eof(stream) == b""
        await wait_for(lambda: live.counters.rejected["no_backend"] == 1)


async def test_round_robin_least_conn_and_source_hash() -> None:
    async with upstream() as a, upstream() as b, upstream() as c:
        ups = (a, b, c)
        ports = [u.port for u in ups]
        async with running_route(tcp_spec(*ports, load_balance="round_robin")) as live:
            for _ in range(6):
                stream = await connect(live)
                async with stream:
                    assert await ping(stream) == b"ping"
            assert [len(u.peers) for u in ups] == [2, 2, 2]

        async with running_route(tcp_spec(*ports, load_balance="least_conn")) as live:
            held = [await connect(live) for _ in range(3)]
            for s in held:
                assert await ping(s) == b"ping"
            assert sorted(u.active for u in ups) == [1, 1, 1]
            await held[0].aclose()
            await wait_for(lambda: sorted(u.active for u in ups) == [0, 1, 1])
            freed = next(u for u in ups if u.active == 0)
            before = len(freed.peers)
            extra = await connect(live)
            assert await ping(extra) == b"ping"
            assert len(freed.peers) == before + 1
            for s in [*held[1:], extra]:
                await s.aclose()

        async with running_route(tcp_spec(*ports, load_balance="source_hash")) as live:
            chosen: dict[str, set[int]] = {}
            for i in range(2, 14):
                src = f"127.0.0.{i}"
                for _ in range(2):
                    counts = [len(u.peers) for u in ups]
                    stream = await connect(live, local_host=src)
                    async with stream:
                        assert await ping(stream) == b"ping"
                    after = [len(u.peers) for u in ups]
                    chosen.setdefault(src, set()).add(
                        next(k for k in range(3) if after[k] != counts[k])
                    )
            assert all(len(v) == 1 for v in chosen.values())  # sticky per client
            assert len(set().union(*chosen.values())) > 1  # and spread across backends


async def test_update_sends_new_connections_to_new_backends_and_keeps_old_ones() -> None:
    async with upstream() as old, upstream() as new, running_route(tcp_spec(old.port)) as live:
        before = await connect(live)
        async with before:
            assert await ping(before) == b"ping"
            live.update(tcp_spec(new.port))
            after = await connect(live)
            async with after:
                assert await ping(after) == b"ping"
            assert await ping(before, b"still") == b"still"
        assert (len(old.peers), len(new.peers)) == (1, 1)


async def test_drain_refuses_new_connections_and_lets_open_ones_finish() -> None:
    async with upstream() as up:
        spec = tcp_spec(up.port)
        live = LiveRoute(spec, counters=Metrics().route("t", spec.key), edge=EdgePolicy())
        async with anyio.create_task_group() as tg:
            await tg.start(serve_tcp, live)
            port = live.bound[0][1]
            stream = await connect(live)
            assert await ping(stream) == b"ping"
            live.close(DEADLINE)
            with anyio.fail_after(DEADLINE):
                await live.listener_closed.wait()
            with pytest.raises(OSError):
                await anyio.connect_tcp("127.0.0.1", port)
            assert await ping(stream, b"draining") == b"draining"
            assert not live.finished.is_set()
            await stream.send_eof()
            assert await recv_until_eof(stream) == b""
            await stream.aclose()
            with anyio.fail_after(DEADLINE):
                await live.finished.wait()


async def test_drain_deadline_closes_what_is_left() -> None:
    async with upstream() as up:
        spec = tcp_spec(up.port)
        live = LiveRoute(spec, counters=Metrics().route("t", spec.key), edge=EdgePolicy())
        async with anyio.create_task_group() as tg:
            await tg.start(serve_tcp, live)
            stream = await connect(live)
            async with stream:
                assert await ping(stream) == b"ping"
                live.close(0.2)
                assert await recv_until_eof(stream) == b""
                with anyio.fail_after(DEADLINE):
                    await live.finished.wait()
        assert live.counters.connections_active == 0


async def test_cancelling_the_listener_closes_everything() -> None:
    async with upstream() as up:
        spec = tcp_spec(up.port)
        live = LiveRoute(spec, counters=Metrics().route("t", spec.key), edge=EdgePolicy())
        async with anyio.create_task_group() as tg:
            await tg.start(serve_tcp, live)
            stream = await connect(live)
            assert await ping(stream) == b"ping"
            tg.cancel_scope.cancel()
        assert live.finished.is_set() and live.listener_closed.is_set()
        async with stream:
            assert await recv_until_eof(stream) == b""


async def test_bind_conflict_raises_before_started() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        spec = tcp_spec(1)
        spec = type(spec)(
            alias="t",
            scheme="tcp4",
            key=type(spec.key)("tcp", "127.0.0.1", taken.getsockname()[1]),
            backends=spec.backends,
        )
        live = LiveRoute(spec, counters=Metrics().route("t", spec.key), edge=EdgePolicy())
        async with anyio.create_task_group() as tg:
            with pytest.raises(OSError):
                await tg.start(serve_tcp, live)
        assert live.bound == []


async def test_ipv6_listener_and_ipv6_upstream() -> None:
    async with upstream(host="::1") as up:
        spec = tcp_spec(up.port, scheme="tcp6", bind="::1", host="::1")
        async with running_route(spec) as live:
            stream = await connect(live, host="::1")
            async with stream:
                assert await ping(stream, b"ping6") == b"ping6"
            with pytest.raises(OSError):
                await anyio.connect_tcp("127.0.0.1", live.bound[0][1])


async def test_dual_stack_listener_takes_ipv4_and_ipv6_clients() -> None:
    async with upstream() as up, running_route(tcp_spec(up.port, scheme="tcp", bind="::")) as live:
        for host in ("127.0.0.1", "::1"):
            stream = await connect(live, host=host)
            async with stream:
                assert await ping(stream) == b"ping"
        assert len(up.peers) == 2


async def test_copy_relay_fallback_echoes_and_half_closes() -> None:
    data = os.urandom(5_000_000)
    async with upstream() as up, running_route(tcp_spec(up.port), zero_copy=False) as live:
        stream = await connect(live)
        async with stream, anyio.create_task_group() as tg:

            async def send() -> None:
                await stream.send(data)
                await stream.send_eof()

            tg.start_soon(send)
            assert await recv_until_eof(stream) == data
        await wait_for(lambda: live.counters.connections_active == 0)
        assert (live.counters.bytes_in, live.counters.bytes_out) == (len(data), len(data))


@pytest.mark.parametrize("zero_copy", [None, False])
async def test_bulk_then_small_messages_on_one_connection(zero_copy: bool | None) -> None:
    """A direction switches to splice on bulk and back to copying when it goes quiet: bytes
    and counters stay exact across the switches, both ways."""
    bulk = os.urandom(3_000_000)
    async with (
        upstream() as up,
        running_route(tcp_spec(up.port), zero_copy=zero_copy) as live,
    ):
        stream = await connect(live)
        async with stream:
            total = 0
            for round_ in range(2):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stream.send, bulk)
                    assert await recv_exactly(stream, len(bulk)) == bulk
                total += len(bulk)
                for i in range(50):
                    payload = f"ping {round_} {i}".encode()
                    assert await ping(stream, payload) == payload
                    total += len(payload)
            await stream.send_eof()
            assert await recv_until_eof(stream) == b""
        await wait_for(lambda: live.counters.connections_active == 0)
        assert (live.counters.bytes_in, live.counters.bytes_out) == (total, total)
