"""The HTTP endpoints served for real (`serve_http` on a loopback port, a raw HTTP client).

A scrape renders every route's series, and /routes every route's JSON; with thousands of
routes that takes hundreds of ms, which must not stall the event loop the UDP relays and the
Docker event stream run on."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from labelproxy.http import HttpState, serve_http
from labelproxy.metrics import Metrics, MetricsDocument, RouteState, StateSnapshot
from labelproxy.runtime import Runtime
from labelproxy.settings import Settings
from labelproxy.spec import ListenKey
from labelproxy.status import RoutesSnapshot
from tests.support.http import StaticDocument, get
from tests.support.lp import free_port, write_routes

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

    def snapshot() -> MetricsDocument:
        snapshot_threads.append(threading.current_thread())
        return MetricsDocument(metrics, StateSnapshot(routes=(route,), docker_connected=True))

    probe = _ThreadProbe()
    metrics.registry.register(probe)
    probe.threads.clear()  # registering collected once, to describe it
    metrics.route("ssh", ListenKey("tcp", "0.0.0.0", 2222)).connections_total = 7
    state = HttpState(ready=lambda: True, routes=lambda: StaticDocument(b"{}"), metrics=snapshot)
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


async def test_routes_is_built_off_the_event_loop_from_a_snapshot_taken_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.current_thread()
    listen_port, http_port = free_port(), free_port()
    routes_file = tmp_path / "routes.yml"
    route = {"scheme": "tcp4", "bind": "127.0.0.1", "port": f"{listen_port}:9", "host": "127.0.0.1"}
    write_routes(routes_file, {"web": route})
    runtime = Runtime(Settings(
        docker_host="none", routes_file=routes_file, http_addr=f"127.0.0.1:{http_port}",
        forwarding="relay",
    ))  # fmt: skip
    taken_in: list[threading.Thread] = []
    built_in: list[threading.Thread] = []
    take, build = runtime.routes_snapshot, RoutesSnapshot.document

    def taking() -> RoutesSnapshot:
        taken_in.append(threading.current_thread())
        return take()

    def building(snapshot: RoutesSnapshot) -> dict[str, Any]:
        built_in.append(threading.current_thread())
        return build(snapshot)

    monkeypatch.setattr(runtime, "routes_snapshot", taking)
    monkeypatch.setattr(RoutesSnapshot, "document", building)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(runtime.serve)  # started once ready: the routes are applied
        web_key = ListenKey("tcp", "127.0.0.1", listen_port)
        runtime.metrics.route("web", web_key).connections_total = 3
        status, body = await get(http_port, "/routes")
        # a snapshot shows the state it was taken in, whatever changes afterwards
        snapshot = runtime.routes_snapshot()
        runtime.metrics.route("web", web_key).connections_total = 4
        later = json.loads(snapshot.encode())
        tg.cancel_scope.cancel()
    assert status == 200
    (shown,) = json.loads(body)["routes"]
    assert shown["route"] == "web" and shown["state"] == "up"
    assert shown["bound"] == [f"127.0.0.1:{listen_port}"]
    assert shown["counters"]["connections_total"] == 3
    assert later["routes"][0]["counters"]["connections_total"] == 3
    assert taken_in[0] is loop_thread and set(taken_in) == {loop_thread}
    assert built_in[0] is not loop_thread  # the /routes request's document: a worker thread
