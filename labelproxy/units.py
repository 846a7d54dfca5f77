"""Parsing of the small value types shared by labels, the routes file and the settings.

Durations (`90s`, `5m`, `1h30m`, `250ms`, a bare number of seconds) and CIDR lists
(`10.0.0.0/8, ::1`). Each parser raises `ValueError` with a message that says what was
expected; callers add where the value came from.

A duration is a finite number of seconds from 0 up to `MAX_DURATION` (a year), written in
decimal digits: `nan`, `inf`, `1e400` or `-5s` are errors, never a float that would break a
deadline (a NaN deadline on a shared timer heap stops every timer behind it).
"""

from __future__ import annotations

import ipaddress
import math
import re

from labelproxy.spec import IPNetwork

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION = 365 * 24 * 3600.0  # a year: anything longer is a typo, not a timeout
_EXAMPLES = "such as 90s, 5m or 1h30m"


def parse_duration(text: str) -> float:
    """Seconds in `text`: `90s`, `5m`, `1h30m`, `250ms` or a bare number of seconds;
    0 up to `MAX_DURATION`."""
    value = text.strip().lower()
    if not value:
        raise ValueError(f"expected a duration {_EXAMPLES}, got an empty value")
    if value.startswith("-"):
        raise ValueError(f"expected a non-negative duration, got {text!r}")
    if _NUMBER.fullmatch(value):
        seconds = float(value)
    else:
        pos = 0
        seconds = 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(value) or pos == 0:
            raise ValueError(f"expected a duration {_EXAMPLES}, got {text!r}")
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"expected a duration of at most 8760h (a year), got {text!r}")
    return seconds


def parse_positive_duration(text: str) -> float:
    """Like `parse_duration`, for a deadline where zero makes no sense (a dial or an idle
    timeout of 0 would end everything at once)."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"expected a positive duration {_EXAMPLES}, got {text!r}")
    return seconds


def check_duration(seconds: float, *, positive: bool = False) -> float:
    """A duration given as a number (not text): the same bounds as `parse_duration`."""
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_DURATION:
        raise ValueError(
            f"expected a duration from 0 to 8760h (a year), got {seconds!r}"
        )
    if positive and seconds == 0:
        raise ValueError(f"expected a positive duration {_EXAMPLES}, got {seconds!r}")
    return seconds


def parse_cidr(text: str) -> IPNetwork:
    """One CIDR (`10.0.0.0/8`) or bare address (`::1`, taken as a /32 or /128)."""
    value = text.strip()
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"expected a CIDR such as 10.0.0.0/8 or fd00::/8, got {value!r}") from None


def parse_cidr_list(text: str) -> tuple[IPNetwork, ...]:
    """A comma (or space) separated list of CIDRs; empty text gives an empty tuple."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    return tuple(parse_cidr(p) for p in parts)
