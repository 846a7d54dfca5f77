"""The connect deadlines of one listener's dials in flight, served by one data-loop timer.

`add` and `discard` are a dict store and a dict pop, not a timer each: the timer is armed
for the earliest deadline and, when it fires, tells every dial past its deadline
(`timed_out`, which may add the dial again for its next backend) and re-arms. Everything
here runs on the data loop (`loop.DataLoop`).
"""

from __future__ import annotations

from time import monotonic
from typing import Protocol

from labelproxy.streams.tcp.loop import DataLoop, Timer


class Expiring(Protocol):
    def timed_out(self) -> None: ...


class Deadlines:
    """(data loop) Deadlines of many `Expiring`s on one timer."""

    __slots__ = ("_due", "_loop", "_timer")

    def __init__(self, loop: DataLoop) -> None:
        self._loop = loop
        self._due: dict[Expiring, float] = {}
        self._timer: Timer | None = None

    def add(self, item: Expiring, timeout: float) -> None:
        due = monotonic() + timeout  # the loop's clock (`DataLoop.time`), without a call
        self._due[item] = due
        timer = self._timer
        if timer is None or due < timer.when:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(due, self._fire)

    def discard(self, item: Expiring) -> None:
        self._due.pop(item, None)

    def _fire(self) -> None:
        self._timer = None
        now = monotonic()
        late = [item for item, due in self._due.items() if due <= now]
        for item in late:
            del self._due[item]
        for item in late:
            item.timed_out()  # may dial the next backend: add() again
        if self._due and self._timer is None:
            self._timer = self._loop.call_at(min(self._due.values()), self._fire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
