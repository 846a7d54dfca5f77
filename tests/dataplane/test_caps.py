"""Connection caps: beyond `max_connections` new connections are closed at once (reason
`limit`) while the admitted ones keep working; a freed slot is reusable; updates of the
route while connections come and go never make the cap lose count."""

from __future__ import annotations

import sys
import threading
from typing import Any

import anyio
import pytest

from tests.support.tcp import (
    connect,
    is_refused_or_closed,
    ping,
    recv_until_eof,
    running_route,
    tcp_spec,
    upstream,
    wait_for,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": True})


async def test_n_plus_one_is_refused_while_n_keep_working() -> None:
    async with upstream() as up, running_route(tcp_spec(up.port, max_connections=3)) as live:
        held = [await connect(live) for _ in range(3)]
        for s in held:
            assert await ping(s) == b"ping"
        extra = await connect(live)
        async with extra:
            assert await recv_until_eof(extra) == b""
        assert live.counters.rejected["limit"] == 1
        for s in held:
            assert await ping(s, b"still here") == b"still here"
        assert len(up.peers) == 3
        await held[0].aclose()
        await wait_for(lambda: live.counters.connections_active == 2)
        again = await connect(live)
        async with again:
            assert await ping(again) == b"ping"
        for s in held[1:]:
            await s.aclose()


async def test_raising_the_cap_in_place_admits_more() -> None:
    async with upstream() as up, running_route(tcp_spec(up.port, max_connections=1)) as live:
        first = await connect(live)
        assert await ping(first) == b"ping"
        live.update(tcp_spec(up.port, max_connections=2))
        second = await connect(live)
        assert await ping(second) == b"ping"
        third = await connect(live)
        async with third:
            assert await recv_until_eof(third) == b""
        assert live.counters.rejected["limit"] == 1
        await first.aclose()
        await second.aclose()


async def test_updates_racing_connections_never_make_the_cap_lose_count() -> None:
    # The data loop admits and releases connections on its thread while the control plane
    # updates the route on another. An update used to copy the cap's count into a new cap
    # while admissions and closes still went to the old one: the count drifted, here up to
    # the limit with no connection open, and the route refused every client after that.
    limit = 3
    async with upstream() as up, running_route(tcp_spec(up.port, max_connections=limit)) as live:
        spec = tcp_spec(up.port, max_connections=limit)
        stop = threading.Event()

        def keep_updating() -> None:
            while not stop.is_set():
                live.update(spec)

        async def churn() -> None:
            for _ in range(150):
                try:
                    stream = await connect(live)
                except OSError:
                    continue
                async with stream:
                    try:
                        await stream.send(b"x")
                        await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        pass  # refused at the limit: closed without a reply

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # hand the GIL over often: updates interleave with admits
        updater = threading.Thread(target=keep_updating, name="test-updater")
        updater.start()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(churn)
        finally:
            stop.set()
            updater.join()
            sys.setswitchinterval(interval)
        await wait_for(lambda: live.counters.connections_active == 0)
        held = [await connect(live) for _ in range(limit)]
        for s in held:
            assert await ping(s) == b"ping"
        assert await is_refused_or_closed(live)
        for s in held:
            await s.aclose()
