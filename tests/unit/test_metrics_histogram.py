"""The lock-free per-route histograms: bucket placement (`le` is inclusive), +Inf, sum and
count, and their exposition, line for line what prometheus_client's own `Histogram` prints."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from labelproxy.histogram import PlainHistogram
from labelproxy.metrics import DIAL_BUCKETS, DURATION_BUCKETS, Metrics, StateSnapshot
from labelproxy.spec import ListenKey

BOUNDS = (0.5, 1.0, 5.0)
KEYS = {
    name: ListenKey("tcp", "::", port) for name, port in (("web", 80), ("db", 5432), ("idle", 9))
}


@pytest.mark.parametrize(
    ("value", "slot"),
    [
        pytest.param(0.0, 0, id="zero"),
        pytest.param(-1.0, 0, id="negative goes to the first bucket"),
        pytest.param(0.25, 0, id="below the first bound"),
        pytest.param(0.5, 0, id="equal to the first bound: le is inclusive"),
        pytest.param(0.5000001, 1, id="just above the first bound"),
        pytest.param(1.0, 1, id="equal to a middle bound"),
        pytest.param(3, 2, id="an int"),
        pytest.param(5.0, 2, id="equal to the last bound"),
        pytest.param(5.0000001, 3, id="just above the last bound: +Inf"),
        pytest.param(1e12, 3, id="far above: +Inf"),
        pytest.param(math.inf, 3, id="infinity: +Inf"),
    ],
)
def test_an_observation_lands_in_its_bucket(value: float, slot: int) -> None:
    hist = PlainHistogram(BOUNDS)
    hist.observe(value)
    expected = [0, 0, 0, 0]
    expected[slot] = 1
    assert hist.counts == expected
    assert hist.count == 1
    assert hist.sum == value


def test_counts_are_per_bucket_and_cumulative_adds_them_up() -> None:
    hist = PlainHistogram(BOUNDS)
    for value in (0.1, 0.5, 0.7, 1.0, 2.0, 4.0, 5.0, 6.0, 60.0):
        hist.observe(value)
    assert hist.counts == [2, 2, 3, 2]
    assert hist.cumulative() == [2, 4, 7, 9]
    assert hist.count == 9
    assert hist.sum == pytest.approx(79.3)


@pytest.mark.parametrize(
    "bounds",
    [
        pytest.param((), id="empty"),
        pytest.param((1.0, 1.0), id="repeated"),
        pytest.param((2.0, 1.0), id="decreasing"),
        pytest.param((1.0, math.inf), id="+Inf is implicit"),
        pytest.param((math.nan,), id="nan"),
    ],
)
def test_bad_bounds_are_refused(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="bounds"):
        PlainHistogram(bounds)


def test_route_observers_feed_that_routes_histograms_only() -> None:
    metrics = Metrics()
    web, db = metrics.route("web", KEYS["web"]), metrics.route("db", KEYS["db"])
    web.observe_dial(0.001)
    web.observe_dial(10.0)
    web.observe_connection(2.0)
    db.observe_connection(20_000.0)
    assert metrics.route("web", KEYS["web"]) is web  # kept, not recreated
    assert web.dial_durations.count == 2
    assert web.dial_durations.counts[DIAL_BUCKETS.index(0.001)] == 1
    assert web.dial_durations.counts[-1] == 1
    assert web.connection_durations.counts[DURATION_BUCKETS.index(5.0)] == 1
    assert db.dial_durations.count == 0
    assert db.connection_durations.counts[-1] == 1
    assert web.connection_durations.sum == 2.0
    assert db.connection_durations.sum == 20_000.0


def _lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_render_has_cumulative_buckets_count_and_sum_per_route() -> None:
    metrics = Metrics()
    web, db = metrics.route("web", KEYS["web"]), metrics.route("db", KEYS["db"])
    for value in (0.0005, 0.003, 0.003, 0.7, 9.0):
        web.observe_dial(value)
    db.observe_dial(0.02)
    text = metrics.render(StateSnapshot()).decode()

    dial = "labelproxy_upstream_dial_duration_seconds"
    assert f"# TYPE {dial} histogram" in text
    assert f"# HELP {dial} Time to connect to an upstream backend." in text
    assert _lines(text, f'{dial}_bucket{{le="0.0005",listen="tcp://[::]:80",route="web"}}') == [
        f'{dial}_bucket{{le="0.0005",listen="tcp://[::]:80",route="web"}} 1.0'
    ]
    expected_web = [
        ("0.0005", 1), ("0.001", 1), ("0.0025", 1), ("0.005", 3), ("0.01", 3), ("0.025", 3),
        ("0.05", 3), ("0.1", 3), ("0.25", 3), ("0.5", 3), ("1.0", 4), ("2.5", 4), ("5.0", 4),
        ("+Inf", 5),
    ]  # fmt: skip
    web_lines = [line for line in _lines(text, f"{dial}_") if 'route="web"' in line]
    web_ids = 'listen="tcp://[::]:80",route="web"'
    assert web_lines == [
        *(f'{dial}_bucket{{le="{le}",{web_ids}}} {n}.0' for le, n in expected_web),
        f'{dial}_count{{listen="tcp://[::]:80",route="web"}} 5.0',
        f'{dial}_sum{{listen="tcp://[::]:80",route="web"}} 9.7065',
    ]
    db_lines = [line for line in _lines(text, f"{dial}_") if 'route="db"' in line]
    assert f'{dial}_bucket{{le="0.01",listen="tcp://[::]:5432",route="db"}} 0.0' in db_lines
    assert f'{dial}_bucket{{le="0.025",listen="tcp://[::]:5432",route="db"}} 1.0' in db_lines
    assert f'{dial}_count{{listen="tcp://[::]:5432",route="db"}} 1.0' in db_lines
    assert f'{dial}_sum{{listen="tcp://[::]:5432",route="db"}} 0.02' in db_lines

    duration = "labelproxy_connection_duration_seconds"
    assert f"# TYPE {duration} histogram" in text
    assert f'{duration}_bucket{{le="14400.0",listen="tcp://[::]:80",route="web"}} 0.0' in text
    assert f'{duration}_count{{listen="tcp://[::]:5432",route="db"}} 0.0' in text


@pytest.mark.parametrize(
    ("name", "doc", "buckets", "observe"),
    [
        pytest.param(
            "labelproxy_upstream_dial_duration_seconds",
            "Time to connect to an upstream backend.",
            DIAL_BUCKETS,
            "observe_dial",
            id="dial",
        ),
        pytest.param(
            "labelproxy_connection_duration_seconds",
            "Lifetime of a relayed TCP connection or UDP session.",
            DURATION_BUCKETS,
            "observe_connection",
            id="connection",
        ),
    ],
)
def test_exposition_matches_prometheus_client_histogram(
    name: str, doc: str, buckets: tuple[float, ...], observe: str
) -> None:
    """What the histograms printed before they were ours: same HELP, TYPE, bucket, count and
    sum lines (only the `_created` series is gone)."""
    values = (0.0, 0.0005, 0.01, 0.123456789, 1 / 3, 1.0, 7.0, 3600.0, 99_999.0, 1e9)
    registry = CollectorRegistry()
    reference = Histogram(name, doc, ["route", "listen"], buckets=buckets, registry=registry)
    metrics = Metrics()
    for route in ("web", "db"):
        for value in values if route == "web" else values[:3]:
            getattr(metrics.route(route, KEYS[route]), observe)(value)
            reference.labels(route, str(KEYS[route])).observe(value)
    metrics.route("idle", KEYS["idle"])
    reference.labels("idle", str(KEYS["idle"]))

    def ours(text: str) -> list[str]:
        return [line for line in text.splitlines() if name in line and "_created" not in line]

    want = ours(generate_latest(registry).decode())
    assert len(want) == 2 + 3 * (len(buckets) + 3)  # HELP, TYPE; per route buckets+Inf, count, sum
    assert ours(metrics.render(StateSnapshot()).decode()) == want
