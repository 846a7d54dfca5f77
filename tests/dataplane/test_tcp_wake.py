"""TCP data plane while a route's container wakes (streams/tcp/wakehold.py): admitted clients
are held unread, then dialled on their own connections once awake; beyond the held-client cap
they are refused (`limit`); with `wake_on: data` a bare connect asks for no wake.

The waker is the test's own (tests/support/waker.py); the end-to-end proof with a real engine
is tests/e2e/test_wake.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from labelproxy.spec import Sleep
from labelproxy.streams.tcp import wakehold
from tests.support.tcp import (
    connect,
    recv_exactly,
    recv_until_eof,
    running_route,
    tcp_spec,
    upstream,
    wait_for,
)
from tests.support.waker import ManualWaker, sleeping

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": True})


async def test_held_clients_are_served_on_their_connection_and_the_cap_refuses_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wakehold, "MAX_HELD", 2)
    waker = ManualWaker()
    sleep = Sleep("c1", "game", idle_timeout=60.0, wake_timeout=10.0)
    async with (
        upstream() as up,
        running_route(tcp_spec(up.port, sleep=sleep), shared=sleeping(waker)) as live,
    ):
        first, second = await connect(live), await connect(live)
        await first.send(b"first")
        await second.send(b"second")
        await wait_for(lambda: waker.holding == 2)
        extra = await connect(live)
        async with extra:
            assert await recv_until_eof(extra) == b""
        await wait_for(lambda: live.counters.rejected["limit"] == 1)
        assert up.peers == [] and waker.requests == 2  # held: nothing dialled yet
        waker.wake()
        async with first, second:
            assert await recv_exactly(first, 5) == b"first"
            assert await recv_exactly(second, 6) == b"second"
        assert waker.holding == 0 and len(up.peers) == 2


async def test_wake_on_data_a_bare_connect_asks_for_no_wake() -> None:
    waker = ManualWaker()
    sleep = Sleep("c1", "game", idle_timeout=60.0, wake_on="data")
    async with upstream() as up, running_route(
        tcp_spec(up.port, sleep=sleep), shared=sleeping(waker)
    ) as live:
        scan = await connect(live)
        await wait_for(lambda: waker.holding == 1)
        await scan.aclose()
        await wait_for(lambda: waker.holding == 0 and live.counters.connections_active == 0)
        assert waker.requests == 0
        client = await connect(live)
        async with client:
            await client.send(b"x")
            await wait_for(lambda: waker.requests == 1)
            waker.wake()
            assert await recv_exactly(client, 1) == b"x"
