"""UDP data plane while a route's container wakes (streams/udp/wakequeue.py): new clients'
datagrams queue, bounded (the overflow dropped and counted `limit`), and go on in order once
awake; at wake_timeout the held sessions close and what they queued counts `no_backend`.

The waker here is the test's own `ManualWaker` (tests/support/waker.py; the process's one
starts containers through Docker: tests/e2e/test_wake.py); routes run `serve_udp` on real
loopback sockets, on both relay paths and both event loops.
"""

from __future__ import annotations

import anyio
import pytest

from labelproxy.spec import Sleep
from labelproxy.streams.udp.wakequeue import CLIENT_DATAGRAMS
from tests.support.udp import (  # anyio_backend, relay_path: fixtures for every test
    anyio_backend,  # noqa: F401
    client_of,
    relay_path,  # noqa: F401
    running_route,
    udp_spec,
    udp_upstream,
    wait_until,
)
from tests.support.waker import ManualWaker, sleeping

pytestmark = pytest.mark.anyio


async def test_queued_datagrams_are_bounded_then_delivered_in_order_once_awake() -> None:
    waker = ManualWaker()
    sleep = Sleep("c1", "game", idle_timeout=60.0, wake_timeout=10.0)
    async with (
        udp_upstream() as up,
        running_route(udp_spec(up.port, sleep=sleep), shared=sleeping(waker)) as live,
        client_of(live) as a,
        client_of(live) as b,
    ):
        sent = CLIENT_DATAGRAMS + 6
        for n in range(sent):
            await a.send(f"a{n}".encode())
        for n in range(3):
            await b.send(f"b{n}".encode())
        await wait_until(lambda: live.counters.udp_dropped["limit"] == 6 and waker.holding == 2)
        assert up.received == []  # nothing went upstream while asleep
        assert waker.requests >= 1
        waker.wake()
        with anyio.fail_after(10):
            got_a = [await a.receive() for _ in range(CLIENT_DATAGRAMS)]
            got_b = [await b.receive() for _ in range(3)]
        assert got_a == [f"a{n}".encode() for n in range(CLIENT_DATAGRAMS)]
        assert got_b == [b"b0", b"b1", b"b2"]
        assert waker.holding == 0
        await a.send(b"later")  # the session is an ordinary one now
        with anyio.fail_after(10):
            assert await a.receive() == b"later"


async def test_held_sessions_close_at_wake_timeout_and_count_what_they_queued() -> None:
    waker = ManualWaker()
    sleep = Sleep("c1", "game", idle_timeout=60.0, wake_timeout=0.3)
    async with (
        udp_upstream() as up,
        running_route(udp_spec(up.port, sleep=sleep), shared=sleeping(waker)) as live,
        client_of(live) as a,
    ):
        for n in range(4):
            await a.send(f"a{n}".encode())
        await wait_until(lambda: live.counters.udp_dropped["no_backend"] == 4)
        assert waker.holding == 0 and live.counters.udp_sessions_active == 0
        assert up.received == []
