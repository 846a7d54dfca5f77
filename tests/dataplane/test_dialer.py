"""`deadlines.Deadlines` on a real `DataLoop`: every dial in flight times out at its own
deadline, on one timer; and the loop's own timers, hand-over, compaction and thread checks.

The connectors here are stand-ins that record when they were timed out: what is under
test is the deadline bookkeeping, on the real loop thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from labelproxy.streams.tcp.deadlines import Deadlines
from labelproxy.streams.tcp.loop import DataLoop

DEADLINE = 5.0


@pytest.fixture
def loop() -> Iterator[DataLoop]:
    data_loop = DataLoop()
    data_loop.start()
    yield data_loop
    data_loop.stop()


def _on_loop(loop: DataLoop, fn: Callable[[], None]) -> None:
    """Run `fn` on the loop's thread and wait for it."""
    done = threading.Event()

    def work() -> None:
        try:
            fn()
        finally:
            done.set()

    loop.submit(work)
    assert done.wait(DEADLINE)


class _Dial:
    def __init__(self, loop: DataLoop, log: list[tuple[str, float]], name: str) -> None:
        self.loop = loop
        self.log = log
        self.name = name

    def timed_out(self) -> None:
        self.log.append((self.name, self.loop.time()))


def test_each_dial_times_out_at_its_deadline_and_finished_dials_never_do(loop: DataLoop) -> None:
    log: list[tuple[str, float]] = []
    fired = threading.Event()
    start: list[float] = []

    def scenario() -> None:
        deadlines = Deadlines(loop)
        start.append(loop.time())
        late = _Dial(loop, log, "late")
        early = _Dial(loop, log, "early")  # added after `late` but due first: re-arms
        done = _Dial(loop, log, "done")
        deadlines.add(late, 0.30)
        deadlines.add(early, 0.10)
        deadlines.add(done, 0.05)
        deadlines.discard(done)  # connected in time
        loop.call_later(0.5, fired.set)  # after both, and well after `done` would have been

    _on_loop(loop, scenario)
    assert fired.wait(DEADLINE)
    assert [name for name, _ in log] == ["early", "late"]
    early_at, late_at = (at - start[0] for _, at in log)
    slack = 1e-6  # monotonic times are large floats: their differences carry rounding
    assert early_at >= 0.10 - slack and late_at >= 0.30 - slack  # never before its deadline
    assert early_at < late_at


def test_a_dial_added_from_a_timeout_is_served_by_the_same_timer(loop: DataLoop) -> None:
    # a timed-out dial goes on to the next backend, which adds a new deadline from inside
    # the timer callback
    log: list[str] = []
    finished = threading.Event()

    class Retrying:
        def __init__(self, deadlines: Deadlines, tries: int) -> None:
            self.deadlines = deadlines
            self.tries = tries

        def timed_out(self) -> None:
            log.append(f"try {self.tries}")
            if self.tries > 1:
                self.tries -= 1
                self.deadlines.add(self, 0.02)
            else:
                finished.set()

    def scenario() -> None:
        deadlines = Deadlines(loop)
        deadlines.add(Retrying(deadlines, 3), 0.02)

    _on_loop(loop, scenario)
    assert finished.wait(DEADLINE)
    assert log == ["try 3", "try 2", "try 1"]


def test_cancelled_timers_never_run_and_do_not_pile_up(loop: DataLoop) -> None:
    # an idle timeout of an hour, cancelled as each short connection closes, must not keep
    # one heap entry per connection for that hour
    ran: list[int] = []
    sizes: list[int] = []

    def scenario() -> None:
        for i in range(10_000):
            loop.call_later(3600, ran.append, i).cancel()
        keep = loop.call_later(3600, ran.append, -1)
        sizes.append(len(loop._timers))  # the heap is what is under test
        keep.cancel()

    _on_loop(loop, scenario)
    assert sizes[0] < 1_000
    assert ran == []


def test_a_failing_callback_is_logged_and_the_loop_goes_on(
    loop: DataLoop, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    loop.submit(boom)
    after = threading.Event()
    loop.submit(after.set)
    assert after.wait(DEADLINE)
    assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)


@pytest.mark.skipif(not __debug__, reason="the thread checks are debug-mode assertions")
def test_loop_only_calls_refuse_other_threads_and_submit_hands_over(loop: DataLoop) -> None:
    # connections, dials and timers belong to the loop's thread: touched from another one
    # (here the test's), the loop says so instead of racing it
    with pytest.raises(AssertionError, match="off the loop thread"):
        loop.call_soon(print)
    with pytest.raises(AssertionError, match="off the loop thread"):
        loop.call_later(1.0, print)
    with pytest.raises(AssertionError, match="off the loop thread"):
        loop.forget(0)
    assert not loop.owns_thread()
    owned: list[bool] = []
    _on_loop(loop, lambda: owned.append(loop.owns_thread()))
    assert owned == [True]
