"""Table tests for one backend's health state machine (health/state.py): rise/fall, the
starting phase, passive ejection with a growing back-off, and the last-ready rule."""

from __future__ import annotations

import pytest

from labelproxy.health.state import BackendState, PassivePolicy
from labelproxy.healthcheck import HealthCheck, Result

CHECK = HealthCheck("tcp", rise=2, fall=3)
POLICY = PassivePolicy(failures=3, base_ejection=10.0, max_ejection=35.0)


def feed(state: BackendState, results: str, check: HealthCheck = CHECK) -> str:
    """Apply results ('p' pass, 'f' fail, 't' timeout); the readiness after each, as 'R'/'.'."""
    names: dict[str, Result] = {"p": "pass", "f": "fail", "t": "timeout"}
    seen = ""
    for i, code in enumerate(results):
        state.record_check(names[code], "detail", check, now=float(i), wall=1000.0 + i)
        seen += "R" if state.ready else "."
    return seen


@pytest.mark.parametrize(
    ("results", "ready", "phase"),
    [
        ("", "", "starting"),
        ("p", ".", "starting"),
        ("pp", ".R", "up"),
        ("pfpp", "...R", "up"),  # a failure restarts the count of passes
        ("ppf", ".RR", "up"),
        ("ppfff", ".RRR.", "down"),
        ("ppftf", ".RRR.", "down"),  # timeouts count as failures
        ("ppffpf", ".RRRRR", "up"),  # a pass restarts the count of failures
        ("ppfffp", ".RRR..", "down"),
        ("ppfffpp", ".RRR..R", "up"),
        ("ffffff", "......", "starting"),  # never up yet
    ],
)
def test_rise_and_fall(results: str, ready: str, phase: str) -> None:
    state = BackendState.new(CHECK, wall=0.0)
    assert not state.ready
    assert feed(state, results) == ready
    assert state.phase == phase


def test_one_reason_per_change_not_per_check() -> None:
    state = BackendState.new(CHECK, wall=0.0)
    results: list[Result] = ["pass", "pass", "pass", "fail", "fail", "fail", "fail"]
    reasons = [
        state.record_check(r, "d", CHECK, now=float(i), wall=float(i))
        for i, r in enumerate(results)
    ]
    assert [r is not None for r in reasons] == [False, True, False, False, False, True, False]
    assert reasons[1] == "check passed 2 time(s) in a row: d"
    assert reasons[5] == "check fail 3 time(s) in a row: d"
    assert state.since == 5.0
    assert (state.last_result, state.last_error, state.last_check) == ("fail", "d", 6.0)


def test_unchecked_backend_is_ready_at_once() -> None:
    state = BackendState.new(HealthCheck("none"), wall=0.0)
    assert (state.ready, state.phase) == (True, "unchecked")


def test_turning_a_check_on_keeps_the_backend_until_fall() -> None:
    state = BackendState.new(HealthCheck("none"), wall=0.0)
    assert state.recheck(CHECK, wall=1.0) is None
    assert (state.ready, state.phase) == (True, "up")
    assert feed(state, "fff") == "RR."


def test_turning_a_check_off_brings_a_down_backend_back() -> None:
    state = BackendState.new(CHECK, wall=0.0)
    assert state.recheck(HealthCheck("none"), wall=1.0) == "healthcheck turned off"
    assert (state.ready, state.phase) == (True, "unchecked")


def ejecting(state: BackendState, *, now: float, others: int = 1) -> str | None:
    reason = None
    for _ in range(POLICY.failures):
        reason = state.record_dial_failure(
            "refused", POLICY, others_ready=others, now=now, wall=now
        )
    return reason


def test_three_failed_dials_eject_with_a_growing_back_off() -> None:
    state = BackendState.new(HealthCheck("none"), wall=0.0)
    assert state.record_dial_failure("refused", POLICY, others_ready=1, now=0, wall=0) is None
    state.record_dial_success()  # the count starts again
    assert state.record_dial_failure("refused", POLICY, others_ready=1, now=0, wall=0) is None
    assert state.record_dial_failure("refused", POLICY, others_ready=1, now=0, wall=0) is None
    reason = state.record_dial_failure("refused", POLICY, others_ready=1, now=0, wall=0)
    assert reason == "ejected for 10s after 3 failed dials (refused)"
    assert (state.ready, state.phase, state.ejected_until) == (False, "ejected", 10.0)
    # while ejected, failures are not counted (it gets no traffic anyway)
    assert state.record_dial_failure("refused", POLICY, others_ready=1, now=1, wall=1) is None
    assert state.expire_ejection(now=9.9, wall=9.9) is None
    assert state.expire_ejection(now=10.0, wall=10.0) == "ejection over"
    assert state.ready
    assert ejecting(state, now=11.0) == "ejected for 20s after 3 failed dials (refused)"
    assert state.expire_ejection(now=31.0, wall=31.0) == "ejection over"
    assert ejecting(state, now=32.0) == "ejected for 30s after 3 failed dials (refused)"
    state.expire_ejection(now=62.0, wall=62.0)
    assert ejecting(state, now=62.0) == "ejected for 35s after 3 failed dials (refused)"  # cap


def test_quiet_time_forgives_earlier_ejections() -> None:
    state = BackendState.new(HealthCheck("none"), wall=0.0)
    ejecting(state, now=0.0)
    state.expire_ejection(now=10.0, wall=10.0)
    ejecting(state, now=11.0)  # 20 s
    state.expire_ejection(now=31.0, wall=31.0)
    # 25 s in the pool forgive two base periods: back to the first step
    assert ejecting(state, now=56.0) == "ejected for 10s after 3 failed dials (refused)"


def test_the_last_ready_backend_is_never_ejected_on_passive_evidence() -> None:
    state = BackendState.new(HealthCheck("none"), wall=0.0)
    for i in range(10):
        reason = state.record_dial_failure("refused", POLICY, others_ready=0, now=i, wall=i)
        assert reason is None
    assert state.ready
    assert state.spared
    state.record_dial_success()
    assert not state.spared


def test_an_ejected_checked_backend_returns_on_a_pass_after_the_back_off() -> None:
    state = BackendState.new(CHECK, wall=0.0)
    feed(state, "pp")
    ejecting(state, now=2.0)
    assert state.expire_ejection(now=20.0, wall=20.0) is None  # waits for its check
    assert state.record_check("pass", "ok", CHECK, now=5.0, wall=5.0) is None  # too early
    assert not state.ready
    reason = state.record_check("pass", "ok", CHECK, now=12.0, wall=12.0)
    assert reason == "ejection over and check passed: ok"
    assert state.ready


def test_a_backend_that_is_not_ready_is_not_ejected() -> None:
    state = BackendState.new(CHECK, wall=0.0)  # starting
    assert ejecting(state, now=0.0) is None
    assert state.dial_failures == 0
