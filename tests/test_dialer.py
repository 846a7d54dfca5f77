"""`dialer.Deadlines`: every dial in flight times out at its own deadline, on one timer.

The connectors here are stand-ins that record when they were timed out: what is under
test is the deadline bookkeeping, on a real event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from labelproxy.streams.dialer import Connector, Deadlines


class _Dial:
    def __init__(self, loop: asyncio.AbstractEventLoop, log: list[tuple[str, float]], name: str):
        self.loop = loop
        self.log = log
        self.name = name

    def timed_out(self) -> None:
        self.log.append((self.name, self.loop.time()))


def _as_connector(dial: _Dial) -> Connector:
    return cast(Connector, dial)


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_each_dial_times_out_at_its_deadline_and_finished_dials_never_do(
    use_uvloop: bool,
) -> None:
    async def scenario() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        log: list[tuple[str, float]] = []
        deadlines = Deadlines(loop)
        start = loop.time()
        late = _Dial(loop, log, "late")
        early = _Dial(loop, log, "early")  # added after `late` but due first: re-arms
        done = _Dial(loop, log, "done")
        deadlines.add(_as_connector(late), 0.30)
        deadlines.add(_as_connector(early), 0.10)
        deadlines.add(_as_connector(done), 0.05)
        deadlines.discard(_as_connector(done))  # connected in time
        async with asyncio.timeout(2):
            while len(log) < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # nothing else fires afterwards
        deadlines.close()
        return [(name, at - start) for name, at in log]

    if use_uvloop:
        uvloop: Any = pytest.importorskip("uvloop")
        fired = uvloop.run(scenario())
    else:
        fired = asyncio.run(scenario())
    assert [name for name, _ in fired] == ["early", "late"]
    early_at, late_at = fired[0][1], fired[1][1]
    slack = 1e-6  # loop times are large floats: their differences carry rounding
    assert early_at >= 0.10 - slack and late_at >= 0.30 - slack  # never before its deadline
    assert early_at < late_at


def test_a_dial_added_from_a_timeout_is_served_by_the_same_timer() -> None:
    # a timed-out dial goes on to the next backend, which adds a new deadline from inside
    # the timer callback
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        deadlines = Deadlines(loop)

        class Retrying:
            def __init__(self, tries: int) -> None:
                self.tries = tries

            def timed_out(self) -> None:
                log.append(f"try {self.tries}")
                if self.tries > 1:
                    self.tries -= 1
                    deadlines.add(cast(Connector, self), 0.02)

        deadlines.add(cast(Connector, Retrying(3)), 0.02)
        async with asyncio.timeout(2):
            while len(log) < 3:
                await asyncio.sleep(0.01)
        deadlines.close()
        return log

    assert asyncio.run(scenario()) == ["try 3", "try 2", "try 1"]
