"""Parsing of the small value types shared by labels, the routes file and the settings.

Durations (`90s`, `5m`, `1h30m`, `250ms`, a bare number of seconds) and CIDR lists
(`10.0.0.0/8, ::1`). Each parser raises `ValueError` with a message that says what was
expected; callers add where the value came from.
"""

from __future__ import annotations

import ipaddress
import re

from labelproxy.spec import IPNetwork

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in `text`: `90s`, `5m`, `1h30m`, `250ms` or a bare number of seconds."""
    value = text.strip().lower()
    if not value:
        raise ValueError("expected a duration such as 90s, 5m or 1h30m, got an empty value")
    try:
        seconds = float(value)
    except ValueError:
        pos = 0
        seconds = 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(value) or pos == 0:
            raise ValueError(
                f"expected a duration such as 90s, 5m or 1h30m, got {text!r}"
            ) from None
    if seconds < 0:
        raise ValueError(f"expected a non-negative duration, got {text!r}")
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
