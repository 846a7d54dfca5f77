"""Wake-on-demand series (metrics.py): a route that is gone takes its wake series with it."""

from __future__ import annotations

from prometheus_client import generate_latest

from labelproxy.metrics import Metrics
from labelproxy.spec import ListenKey


def test_forget_drops_the_wake_series_of_that_listen_key_only() -> None:
    metrics = Metrics()
    gone, kept = ListenKey("tcp", "127.0.0.1", 25565), ListenKey("udp", "127.0.0.1", 2456)
    for alias, key in (("mc", gone), ("valheim", kept)):
        metrics.route(alias, key)
        metrics.wakes_total.labels(alias, str(key), "ok").inc()
        metrics.sleeps_total.labels(alias, str(key), "stop").inc()
        metrics.held_clients.labels(alias, str(key)).set(0)
    metrics.forget(gone)
    text = generate_latest(metrics.registry).decode()
    assert str(gone) not in text
    for name in ("labelproxy_wakes_total", "labelproxy_sleeps_total", "labelproxy_held_clients"):
        assert f'{name}{{listen="{kept}"' in text
