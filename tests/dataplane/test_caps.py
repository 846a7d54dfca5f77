"""Connection caps: beyond `max_connections` new connections are closed at once (reason
`limit`) while the admitted ones keep working; a freed slot is reusable."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.tcp import (
    connect,
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
