"""Helpers for the UDP data-plane tests: a test-owned UDP upstream, a running route, log capture.

No tests live here; `tests/dataplane/test_udp.py` and `test_udp_policy.py` import it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from labelproxy.spec import Backend, EdgePolicy, RouteSpec, Scheme
from labelproxy.streams.hooks import Hook
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.shared import SharedState
from labelproxy.streams.udp import batched as udp_batched
from labelproxy.streams.udp import mmsg as udp_mmsg
from labelproxy.streams.udp.server import serve_udp
from tests.support.routes import route_spec, serving

logger = logging.getLogger(__name__)

#: The relay's two hot paths; UDP tests run through each (`relay_path` fixtures).
RELAY_PATHS = [
    pytest.param(
        "batched",
        marks=pytest.mark.skipif(not udp_mmsg.available(), reason="no recvmmsg/sendmmsg here"),
    ),
    "plain",
]


def use_relay_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make `serve_udp` use the batched (recvmmsg/sendmmsg) or the per-datagram relay."""
    monkeypatch.setattr(udp_batched, "ENABLED", path == "batched")


DEADLINE = 5.0
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def strip_proxy_v2(data: bytes) -> bytes:
    """The payload after a PROXY v2 header (or `data` itself when there is none)."""
    if not data.startswith(V2_SIGNATURE):
        return data
    return data[16 + int.from_bytes(data[14:16], "big") :]


class UdpUpstream:
    """A UDP server owned by the test: records every datagram and its source, may echo."""

    def __init__(self, sock: anyio.abc.UDPSocket, *, echo: bool, strip_proxy: bool) -> None:
        self.sock = sock
        self.echo = echo
        self.strip_proxy = strip_proxy
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self._arrived = anyio.Event()

    @property
    def port(self) -> int:
        return int(self.sock.extra(anyio.abc.SocketAttribute.local_port))

    def sources(self) -> set[tuple[str, int]]:
        return {src for _, src in self.received}

    async def serve(self) -> None:
        async for data, addr in self.sock:
            source = (str(addr[0]), int(addr[1]))
            self.received.append((data, source))
            self._arrived.set()
            self._arrived = anyio.Event()
            if self.echo:
                payload = strip_proxy_v2(data) if self.strip_proxy else data
                await self.sock.sendto(payload, source[0], source[1])

    async def wait_for(self, count: int, *, timeout: float = DEADLINE) -> None:
        """Wait until at least `count` datagrams have arrived."""
        with anyio.fail_after(timeout):
            while len(self.received) < count:
                await self._arrived.wait()


@asynccontextmanager
async def udp_upstream(
    host: str = "127.0.0.1", *, port: int = 0, echo: bool = True, strip_proxy: bool = False
) -> AsyncIterator[UdpUpstream]:
    sock = await anyio.create_udp_socket(
        family=socket.AF_INET6 if ":" in host else socket.AF_INET, local_host=host, local_port=port
    )
    async with sock, anyio.create_task_group() as tg:
        upstream = UdpUpstream(sock, echo=echo, strip_proxy=strip_proxy)
        tg.start_soon(upstream.serve)
        yield upstream
        tg.cancel_scope.cancel()


def udp_spec(
    backend_port: int | None,
    *,
    bind: str = "127.0.0.1",
    scheme: Scheme = "udp4",
    backend_host: str = "127.0.0.1",
    port: int = 0,
    **options: Any,
) -> RouteSpec:
    backends = () if backend_port is None else (Backend(backend_host, backend_port),)
    return route_spec("echo", scheme, (bind, port), backends, options)


def running_route(
    spec: RouteSpec,
    *,
    edge: EdgePolicy | None = None,
    extra_hooks: tuple[Hook, ...] = (),
    shared: SharedState | None = None,
) -> AbstractAsyncContextManager[LiveRoute]:
    """serve_udp for `spec` on a fresh Metrics; closed without a drain (and awaited) on exit.
    `shared`: the global caps and own listeners of several routes (default: its own)."""
    return serving(
        spec, serve=serve_udp, edge=edge, metrics=None, shared=shared, extra_hooks=extra_hooks
    )


@asynccontextmanager
async def client_of(
    live: LiveRoute, *, local_host: str | None = None, remote_host: str | None = None
) -> AsyncIterator[anyio.abc.ConnectedUDPSocket]:
    host, port = live.bound[0]
    remote = remote_host or ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
    sock = await anyio.create_connected_udp_socket(
        remote,
        port,
        family=socket.AF_INET6 if ":" in remote else socket.AF_INET,
        local_host=local_host,
    )
    async with sock:
        yield sock


async def ask(client: anyio.abc.ConnectedUDPSocket, payload: bytes) -> bytes:
    """Send `payload` and return the next datagram received, within the deadline."""
    await client.send(payload)
    with anyio.fail_after(DEADLINE):
        return await client.receive()


async def wait_until(predicate: Callable[[], bool], *, timeout: float = DEADLINE) -> None:
    """For state with no event to await (plain counters): check often, up to a deadline."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


class AccessLog(logging.Handler):
    """Collects `labelproxy.access` records; `wait_for` awaits one matching a predicate."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._event.set()

    def closed(self, reason: str | None = None) -> list[logging.LogRecord]:
        return [
            r
            for r in self.records
            if getattr(r, "action", "") == "close"
            and (reason is None or getattr(r, "reason", "") == reason)
        ]

    async def wait_closed(self, count: int = 1, *, reason: str | None = None) -> None:
        with anyio.fail_after(DEADLINE):
            while len(self.closed(reason)) < count:
                self._event = anyio.Event()
                await self._event.wait()


@asynccontextmanager
async def access_log() -> AsyncIterator[AccessLog]:
    handler = AccessLog()
    log = logging.getLogger("labelproxy.access")
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


# Shared by the UDP test modules (imported there): each test runs on uvloop and plain asyncio,
# and on both relay paths (batched recvmmsg/sendmmsg and per datagram).
@pytest.fixture(params=[pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"), "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(autouse=True, params=RELAY_PATHS)
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    path: str = request.param
    use_relay_path(monkeypatch, path)
    return path
