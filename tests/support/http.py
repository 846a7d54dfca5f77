"""Helpers for the HTTP endpoint tests: an in-process `serve_http` on a loopback port, a raw
HTTP/1.1 client on real sockets, and a gate that holds a document's rendering until released.

No tests live here; `tests/dataplane/test_http.py` and `test_http_limits.py` import it.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import anyio
import anyio.abc
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from labelproxy.http import HttpLimits, HttpState, serve_http
from labelproxy.metrics import Metrics, MetricsDocument, StateSnapshot
from tests.support.lp import free_port

GATE_TIMEOUT = 10.0


@asynccontextmanager
async def serving(state: HttpState, limits: HttpLimits | None = None) -> AsyncIterator[int]:
    """`serve_http` on a free 127.0.0.1 port (yielded) for the duration of the block."""
    port = free_port()
    async with anyio.create_task_group() as tg:
        await tg.start(partial(
            serve_http, host="127.0.0.1", port=port, state=state, limits=limits or HttpLimits()
        ))  # fmt: skip
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


async def send_request(port: int, path: str, method: str = "GET") -> anyio.abc.SocketStream:
    """A new connection that has sent one request; read its answer with `read_response`."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return stream


async def read_response(stream: anyio.abc.SocketStream, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of the response on `stream`, read until the server closes; closes it.
    Status 0: the server closed the connection without answering."""
    chunks: list[bytes] = []
    async with stream:
        with anyio.fail_after(timeout):
            try:
                async for chunk in stream:
                    chunks.append(chunk)
            except anyio.BrokenResourceError:
                pass
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head:
        return 0, b""
    return int(head.split()[1]), body


async def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    return await read_response(await send_request(port, path), timeout)


@dataclass(frozen=True)
class StaticDocument:
    """A /routes snapshot whose body is fixed."""

    body: bytes

    def encode(self) -> bytes:
        return self.body


class Gate:
    """Holds every rendering that passes through it (on its worker thread) until `open()`;
    counts the renderings and records their threads. As a context manager it opens on exit,
    so that a failing test does not leave renderings waiting (and the server's shutdown)."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self.passed: list[threading.Thread] = []

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()

    def open(self) -> None:
        self._open.set()

    def wait(self) -> None:
        self.passed.append(threading.current_thread())
        self._open.wait(GATE_TIMEOUT)


class GatedCollector(Collector):
    """A collector in a `Metrics` registry whose collection waits at `gate`."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def describe(self) -> list[Metric]:  # registering must not collect (and wait)
        return []

    def collect(self) -> Iterator[Metric]:
        self._gate.wait()
        yield GaugeMetricFamily("gated", "A collection that waited at the test's gate.", value=1)


@dataclass(frozen=True)
class GatedDocument:
    """A /routes snapshot whose encoding waits at `gate`."""

    gate: Gate
    body: bytes = b'{"routes": []}\n'

    def encode(self) -> bytes:
        self.gate.wait()
        return self.body


def state_of(metrics: Metrics | None = None, *, routes: bytes = b"{}\n") -> HttpState:
    shown = metrics or Metrics()
    return HttpState(
        ready=lambda: True,
        routes=lambda: StaticDocument(routes),
        metrics=lambda: MetricsDocument(shown, StateSnapshot()),
    )
