"""run_blocking: results and exceptions come back to the awaiting task; cancelling abandons a
stuck call at once, on a daemon thread the interpreter does not wait for at exit."""

from __future__ import annotations

import threading

import anyio
import anyio.to_thread
import pytest

from labelproxy.sources.blocking import run_blocking

pytestmark = pytest.mark.anyio

DEADLINE = 5.0


async def test_result_and_exception_come_back() -> None:
    assert await run_blocking(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        await run_blocking(lambda: 1 / 0)


async def test_cancel_abandons_a_stuck_call_on_a_daemon_thread() -> None:
    release = threading.Event()
    entered = threading.Event()
    seen: list[threading.Thread] = []

    def stuck() -> None:
        seen.append(threading.current_thread())
        entered.set()
        release.wait(DEADLINE)

    try:
        with anyio.fail_after(DEADLINE):
            with anyio.move_on_after(0.1) as scope:
                await run_blocking(stuck)
        assert scope.cancelled_caught and entered.is_set()
        [thread] = seen
        assert thread.daemon and thread.is_alive()
    finally:
        release.set()
    # it hands its (dropped) outcome to this loop, so join it without blocking the loop
    await anyio.to_thread.run_sync(thread.join, DEADLINE)
    assert not thread.is_alive()
