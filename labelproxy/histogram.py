"""`PlainHistogram`: a Prometheus histogram of plain numbers, observed without locks.

The per-route dial and connection durations are observed by the data plane on its own thread
and read at scrape time; `le_labels` formats the bucket bounds exactly as prometheus_client's
own `Histogram` does, so the exposition is the same line for line.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from itertools import accumulate, pairwise

from prometheus_client.utils import floatToGoString


class PlainHistogram:
    """A Prometheus histogram the data plane observes into without locks.

    `counts[i]` is the number of observations in `(bounds[i-1], bounds[i]]` (not cumulative);
    the extra last slot counts those above every bound (`+Inf`). Prometheus's `le` is
    inclusive, hence `bisect_left`: a value equal to a bound lands in that bound's bucket.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if not bounds or any(not math.isfinite(b) for b in bounds):
            raise ValueError(f"histogram bounds must be finite and non-empty: {bounds!r}")
        if any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"histogram bounds must increase: {bounds!r}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        """Observations at or below each bound, then the total (the `+Inf` bucket)."""
        return list(accumulate(self.counts))


_go_float: Callable[[float], str] = floatToGoString  # typed alias: the library's is untyped


def le_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """The `le` label values, formatted as prometheus_client's own `Histogram` formats them."""
    return (*(_go_float(b) for b in bounds), "+Inf")
