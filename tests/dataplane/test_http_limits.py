"""The HTTP port under abuse: idle and slow clients, bursts of scrapes (real sockets).

Whoever can reach the port must not get the process marked unhealthy: /healthz is answered
while 200 connections sit idle or scrapes are slow, idle connections are closed at the header
deadline (the oldest first when too many wait), and a burst of scrapes shares one rendering.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from typing import Any

import anyio
import anyio.abc
import pytest

from labelproxy.http import HttpLimits, HttpState
from labelproxy.metrics import Metrics, MetricsDocument, StateSnapshot
from tests.support.http import (
    Gate,
    GatedCollector,
    GatedDocument,
    get,
    read_response,
    send_request,
    serving,
    state_of,
)
from tests.support.lp import labelproxy

HEALTHCHECK_TIMEOUT = 2.0  # the image's HEALTHCHECK: urlopen(..., timeout=2)


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": True})


def test_healthz_answers_while_200_idle_connections_are_held_open() -> None:
    with labelproxy({"LABELPROXY_DOCKER_HOST": "none"}) as lp:
        idle = [socket.create_connection(("127.0.0.1", lp.http_port), timeout=5)
                for _ in range(200)]  # fmt: skip
        try:
            began = time.monotonic()
            with urllib.request.urlopen(lp.base + "/healthz", timeout=HEALTHCHECK_TIMEOUT) as r:
                assert (r.status, r.read()) == (200, b"ok\n")
            assert time.monotonic() - began < HEALTHCHECK_TIMEOUT
            assert lp.get("/metrics")[0] == 200
        finally:
            for s in idle:
                s.close()


@pytest.mark.anyio
async def test_a_connection_without_a_whole_request_head_is_closed_at_the_header_deadline() -> None:
    deadline = HttpLimits().header_deadline
    async with serving(state_of()) as port:
        began = anyio.current_time()
        idle = await anyio.connect_tcp("127.0.0.1", port)
        trickling = await anyio.connect_tcp("127.0.0.1", port)

        async def trickle() -> None:  # one byte every 0.1 s, never the end of the head
            try:
                for byte in b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 20:
                    await trickling.send(bytes([byte]))
                    await anyio.sleep(0.1)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(trickle)
            for stream in (idle, trickling):
                assert await read_response(stream, timeout=deadline + 1.5) == (0, b"")
                assert anyio.current_time() - began >= deadline - 0.1
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_over_the_cap_of_waiting_connections_the_longest_waiting_is_closed() -> None:
    async with serving(state_of(), HttpLimits(max_waiting=8)) as port:
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(8)]
        # a ninth connection: the oldest idle one is closed to make room, the probe answered
        assert await get(port, "/healthz", timeout=HEALTHCHECK_TIMEOUT) == (200, b"ok\n")
        assert await read_response(idle[0], timeout=2) == (0, b"")
        # the others were kept: they can still send their request
        await idle[1].send(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert await read_response(idle[1]) == (200, b"ok\n")
        for stream in idle[2:]:
            await stream.aclose()


def _gated_state(gate: Gate, taken: list[str]) -> HttpState:
    """/metrics and /routes both wait at `gate`; `taken` records each snapshot taken."""
    metrics = Metrics()
    metrics.registry.register(GatedCollector(gate))

    def metrics_snapshot() -> MetricsDocument:
        taken.append("/metrics")
        return MetricsDocument(metrics, StateSnapshot())

    def routes_snapshot() -> GatedDocument:
        taken.append("/routes")
        return GatedDocument(gate)

    return HttpState(ready=lambda: True, routes=routes_snapshot, metrics=metrics_snapshot)


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/metrics", "/routes"])
async def test_scrapes_that_arrive_during_a_rendering_share_it(path: str) -> None:
    gate = Gate()
    taken: list[str] = []
    async with serving(_gated_state(gate, taken)) as port:
        with gate:
            scrapes = [await send_request(port, path) for _ in range(20)]
            # the rendering waits at the gate: health probes are answered meanwhile
            assert await get(port, "/healthz", timeout=HEALTHCHECK_TIMEOUT) == (200, b"ok\n")
            assert await get(port, "/readyz", timeout=HEALTHCHECK_TIMEOUT) == (200, b"ready\n")
        responses = [await read_response(s) for s in scrapes]
    assert {status for status, _ in responses} == {200}
    assert len({body for _, body in responses}) == 1
    assert taken == [path]  # one snapshot ...
    assert len(gate.passed) == 1  # ... and one rendering for the twenty scrapes


@pytest.mark.anyio
async def test_scrapes_beyond_the_cap_get_503_at_once_and_probes_are_still_answered() -> None:
    gate = Gate()
    taken: list[str] = []
    limits = HttpLimits()
    extra = 16
    statuses: list[int] = []
    refused = anyio.Event()

    async def collect(stream: anyio.abc.SocketStream) -> None:
        statuses.append((await read_response(stream))[0])
        if statuses.count(503) == extra:
            refused.set()

    async with serving(_gated_state(gate, taken)) as port, anyio.create_task_group() as tg:
        with gate:
            for _ in range(limits.max_documents + extra):
                tg.start_soon(collect, await send_request(port, "/metrics"))
            assert await get(port, "/healthz", timeout=HEALTHCHECK_TIMEOUT) == (200, b"ok\n")
            with anyio.fail_after(5):
                await refused.wait()  # the extra scrapes are refused while the others wait
            assert statuses == [503] * extra
    assert statuses.count(200) == limits.max_documents
    assert len(gate.passed) == 1


@pytest.mark.anyio
async def test_a_failed_rendering_answers_500_and_the_next_scrape_renders_again() -> None:
    attempts: list[int] = []

    class Flaky:
        def encode(self) -> bytes:
            attempts.append(1)
            if len(attempts) == 1:
                raise RuntimeError("the first rendering fails")
            return b"{}\n"

    metrics = MetricsDocument(Metrics(), StateSnapshot())
    state = HttpState(ready=lambda: True, routes=Flaky, metrics=lambda: metrics)
    async with serving(state) as port:
        assert (await get(port, "/routes"))[0] == 500
        assert await get(port, "/routes") == (200, b"{}\n")
