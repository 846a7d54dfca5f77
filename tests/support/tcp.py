"""Helpers for the TCP data-plane tests: test-owned upstreams, a running route, clients.

No tests live here; `tests/dataplane/test_tcp.py`, `test_proxyproto.py`, `test_acl.py` and
`test_caps.py` import it. Everything is real loopback sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.abc
from anyio.streams.stapled import MultiListener

from labelproxy.metrics import Metrics
from labelproxy.spec import (
    Backend,
    EdgePolicy,
    RouteSpec,
    Scheme,
)
from labelproxy.streams.hooks import Hook
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.shared import SharedState
from labelproxy.streams.tcp.server import serve_tcp
from tests.support.routes import route_spec, serving

DEADLINE = 10.0

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


async def echo_handler(stream: anyio.abc.SocketStream) -> None:
    """Echo everything; on the client's EOF, half-close back and end."""
    async with stream:
        try:
            async for chunk in stream:
                await stream.send(chunk)
            await stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


class Upstream:
    """A TCP server owned by the test: counts connections and remembers their peers."""

    def __init__(self, listener: MultiListener[anyio.abc.SocketStream] | Any, handler: Handler):
        self.listener = listener
        self.handler = handler
        self.peers: list[tuple[str, int]] = []
        self.active = 0

    @property
    def port(self) -> int:
        return int(self.listener.extra(anyio.abc.SocketAttribute.local_port))

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        peer = stream.extra(anyio.abc.SocketAttribute.remote_address)
        self.peers.append((str(peer[0]), int(peer[1])))
        self.active += 1
        try:
            await self.handler(stream)
        finally:
            self.active -= 1


@asynccontextmanager
async def upstream(
    handler: Handler = echo_handler, *, host: str = "127.0.0.1"
) -> AsyncIterator[Upstream]:
    """Run a TCP server on `host`, an ephemeral port, for the duration of the block."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=0)
    up = Upstream(listener, handler)
    async with listener, anyio.create_task_group() as tg:  # serve() leaves it open
        tg.start_soon(listener.serve, up._handle)
        try:
            yield up
        finally:
            tg.cancel_scope.cancel()


def tcp_spec(
    *ports: int,
    alias: str = "t",
    scheme: Scheme = "tcp4",
    bind: str = "127.0.0.1",
    host: str = "127.0.0.1",
    **options: Any,
) -> RouteSpec:
    """A TCP route on an ephemeral port relaying to `host`:`ports`."""
    backends = tuple(Backend(host, p) for p in ports)
    return route_spec(alias, scheme, (bind, 0), backends, options)


def running_route(
    spec: RouteSpec,
    edge: EdgePolicy | None = None,
    *,
    metrics: Metrics | None = None,
    zero_copy: bool | None = None,
    shared: SharedState | None = None,
    extra_hooks: tuple[Hook, ...] = (),
) -> AbstractAsyncContextManager[LiveRoute]:
    """Serve `spec` with `serve_tcp`; on exit close it (no drain) and wait until finished.
    `shared`: the global caps and own listeners of several routes (default: its own)."""
    serve = partial(serve_tcp, zero_copy=zero_copy)
    return serving(
        spec, serve=serve, edge=edge, metrics=metrics, shared=shared, extra_hooks=extra_hooks
    )


def port_of(live: LiveRoute) -> int:
    return live.bound[0][1]


async def connect(
    live: LiveRoute, *, host: str = "127.0.0.1", local_host: str | None = None
) -> anyio.abc.SocketStream:
    with anyio.fail_after(DEADLINE):
        return await anyio.connect_tcp(host, port_of(live), local_host=local_host)


async def recv_exactly(stream: anyio.abc.SocketStream, n: int) -> bytes:
    """Read exactly `n` bytes (fails on EOF or after the deadline)."""
    data = bytearray()
    with anyio.fail_after(DEADLINE):
        while len(data) < n:
            data += await stream.receive(n - len(data))
    return bytes(data)


async def recv_until_eof(stream: anyio.abc.SocketStream) -> bytes:
    """Read everything until the peer's EOF (or reset), within the deadline."""
    data = bytearray()
    with anyio.fail_after(DEADLINE):
        try:
            async for chunk in stream:
                data += chunk
        except (anyio.BrokenResourceError, ConnectionResetError):
            pass
    return bytes(data)


async def ping(stream: anyio.abc.SocketStream, payload: bytes = b"ping") -> bytes:
    await stream.send(payload)
    return await recv_exactly(stream, len(payload))


async def is_refused_or_closed(live: LiveRoute) -> bool:
    """True when a new connection is refused, or accepted and closed without data."""
    try:
        stream = await connect(live)
    except OSError:
        return True
    async with stream:
        return await recv_until_eof(stream) == b""


async def wait_for(predicate: Callable[[], bool], *, timeout: float = DEADLINE) -> None:
    """Wait until `predicate()` holds, yielding to the loop between checks."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)
