"""The HTTP endpoints served for real (`serve_http` on a loopback port, a raw HTTP client).

A scrape renders every route's series; with a thousand routes that takes a few hundred ms,
which must not stall the event loop the UDP relays and the Docker event stream run on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from labelproxy.http import HttpState, serve_http
from labelproxy.metrics import Metrics, RouteState, StateSnapshot
from labelproxy.spec import ListenKey
from tests.support.lp import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": True})


class _ThreadProbe(Collector):
    """Records the thread each collection runs on."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def collect(self) -> Iterator[Metric]:
        self.threads.append(threading.current_thread())
        yield GaugeMetricFamily("probe", "The thread probe.", value=1)


async def _get(port: int, path: str) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        chunks = []
        with anyio.fail_after(10):
            async for chunk in stream:
                chunks.append(chunk)
    return b"".join(chunks)


async def test_a_scrape_is_written_off_the_event_loop_from_a_snapshot_taken_on_it() -> None:
    metrics = Metrics()
    loop_thread = threading.current_thread()
    snapshot_threads: list[threading.Thread] = []
    route = RouteState(
        route="ssh", scheme="tcp", listen="tcp://0.0.0.0:2222", targets="a:22", up=True
    )

    def snapshot() -> StateSnapshot:
        snapshot_threads.append(threading.current_thread())
        return StateSnapshot(routes=(route,), docker_connected=True)

    metrics.set_state_provider(snapshot)
    probe = _ThreadProbe()
    metrics.registry.register(probe)
    probe.threads.clear()  # registering collected once, to describe it
    metrics.route("ssh", ListenKey("tcp", "0.0.0.0", 2222)).connections_total = 7
    state = HttpState(ready=lambda: True, routes=lambda: [], metrics=metrics)
    port = free_port()
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: serve_http(
            host="127.0.0.1", port=port, state=state, task_status=task_status))  # fmt: skip
        response = await _get(port, "/metrics")
        tg.cancel_scope.cancel()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    ids = b'listen="tcp://0.0.0.0:2222",route="ssh"'
    assert b"labelproxy_connections_total{" + ids + b"} 7.0" in body
    assert b"labelproxy_route_up{" + ids + b"} 1.0" in body  # from the snapshot
    assert snapshot_threads == [loop_thread]  # the runtime's state is read on its own thread
    assert probe.threads and all(t is not loop_thread for t in probe.threads)
