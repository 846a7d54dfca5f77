"""Durations: the accepted syntax, and one clear message for each value that is not a finite
number of seconds within a year (NaN, infinity, overflow, negatives)."""

from __future__ import annotations

import pytest

from labelproxy.units import MAX_DURATION, parse_duration, parse_positive_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25), ("90", 90.0),
        ("1.5", 1.5), (" 2M ", 120.0), ("0", 0.0), ("0s", 0.0), ("8760h", MAX_DURATION),
    ],
)  # fmt: skip
def test_good_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nan", "such as 90s"),
        ("NaN", "such as 90s"),
        ("inf", "such as 90s"),
        ("-inf", "non-negative"),
        ("infinity", "such as 90s"),
        ("1e400", "such as 90s"),
        ("1e3", "such as 90s"),
        ("9" * 400, "at most 8760h (a year)"),
        ("9" * 400 + "h", "at most 8760h (a year)"),
        ("8761h", "at most 8760h (a year)"),
        ("-5s", "non-negative"),
        ("-5", "non-negative"),
        ("+5", "such as 90s"),
        ("1_000", "such as 90s"),
        ("", "empty value"),
        ("5 minutes", "such as 90s"),
    ],
)
def test_bad_durations_are_one_line_errors_naming_the_value(text: str, expected: str) -> None:
    with pytest.raises(ValueError, match="expected") as info:
        parse_duration(text)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if text:
        assert repr(text) in message


@pytest.mark.parametrize("text", ["0", "0s", "0ms", "0.0"])
def test_positive_duration_refuses_zero(text: str) -> None:
    with pytest.raises(ValueError, match="expected a positive duration"):
        parse_positive_duration(text)
