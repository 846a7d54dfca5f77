"""A bad deadline cannot stop the data plane's timers.

Validation keeps NaN and infinite durations out of every spec (tests/unit/test_units.py and the
label and routes-file tables); these tests go one level below it, to a `RouteSpec` built
directly, and show that one route's NaN idle timeout does not stop the idle timeouts of
another route sharing the TCP data-plane loop.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import anyio
import pytest

from labelproxy.streams.tcp.loop import DataLoop
from tests.support.tcp import (
    DEADLINE,
    connect,
    ping,
    recv_until_eof,
    running_route,
    tcp_spec,
    upstream,
)

pytestmark = pytest.mark.anyio

IDLE_CLOSE_DEADLINE = 2.5


@pytest.fixture(params=[pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"), "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_timer_after_a_non_finite_one_still_fires(bad: float) -> None:
    loop = DataLoop()
    loop.start()
    fired = threading.Event()
    never = threading.Event()
    try:
        def schedule() -> None:
            loop.call_at(bad, never.set)
            loop.call_later(0.05, fired.set)

        loop.submit(schedule)
        assert fired.wait(DEADLINE), "a timer behind a non-finite deadline never fired"
        assert not never.is_set()
    finally:
        loop.stop()


def test_negative_infinite_deadline_runs_at_once() -> None:
    loop = DataLoop()
    loop.start()
    fired = threading.Event()
    try:
        loop.submit(lambda: loop.call_at(-math.inf, fired.set))
        assert fired.wait(DEADLINE)
    finally:
        loop.stop()


async def test_nan_idle_timeout_on_one_route_does_not_stop_another_routes_timeout() -> None:
    async with (
        upstream() as up,
        running_route(tcp_spec(up.port, alias="nan", idle_timeout=math.nan)) as bad,
        running_route(tcp_spec(up.port, alias="good", idle_timeout=0.3)) as good,
    ):
        first = await connect(bad)  # puts the NaN deadline on the shared timer heap
        async with first:
            assert await ping(first) == b"ping"
            idle = await connect(good)
            async with idle:
                assert await ping(idle) == b"ping"
                # closed by its 0.3 s idle timeout (not seconds later, when some other
                # timer happens to shake the heap)
                with anyio.fail_after(IDLE_CLOSE_DEADLINE):
                    assert await recv_until_eof(idle) == b""
            assert await ping(first) == b"ping"  # the NaN route still relays
