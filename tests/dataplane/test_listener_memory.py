"""A stopped listener is freed by reference counting alone: no reference cycle holds it.

The runtime freezes what exists once the first snapshot is applied (`gc.freeze()`): the
collector never looks at those objects again, so a listener started before that and stopped
later would stay in memory for good if a cycle held it. Each test stops a route through the
reconciler with the collector off, one connection or session ended before and one still
open (ended by the drain deadline), and checks that the listener's objects are gone at once.
"""

from __future__ import annotations

import gc
import socket
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest

from labelproxy.metrics import Metrics
from labelproxy.reconciler import Reconciler
from labelproxy.spec import Backend, DesiredState, EdgePolicy, ListenKey, RouteSpec
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.tcp.server import TcpServer
from labelproxy.streams.udp.relay import UdpRelay
from tests.support import tcp, udp
from tests.support.ports import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def route(transport: str, target: int) -> RouteSpec:
    kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
    port = free_port(kind)
    return RouteSpec(
        alias="mem",
        scheme="tcp4" if transport == "tcp" else "udp4",
        key=ListenKey(transport, "127.0.0.1", port),  # type: ignore[arg-type]
        backends=(Backend("127.0.0.1", target),),
    )


def listener_objects(
    live: LiveRoute, kind: type[TcpServer] | type[UdpRelay]
) -> list[weakref.ref[Any]]:
    """Weak references to the route's `LiveRoute` and its listener object (`kind`)."""
    found = [o for o in gc.get_objects() if isinstance(o, kind) and o.live is live]
    assert len(found) == 1
    return [weakref.ref(live), weakref.ref(found[0])]


async def tcp_traffic(live: LiveRoute, stopping: Callable[[], Awaitable[None]]) -> None:
    """One connection ended before the stop, one still open when it comes."""
    async with await tcp.connect(live) as done:
        assert await tcp.ping(done) == b"ping"
    async with await tcp.connect(live) as held:
        assert await tcp.ping(held) == b"ping"
        await stopping()
        assert await tcp.recv_until_eof(held) == b""


async def udp_traffic(live: LiveRoute, stopping: Callable[[], Awaitable[None]]) -> None:
    """A session still open when the stop comes."""
    async with udp.client_of(live) as client:
        assert await udp.ask(client, b"hi") == b"hi"
        await stopping()


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_a_stopped_listener_is_freed_without_the_collector(
    collector_off: None, transport: str
) -> None:
    upstream = tcp.upstream() if transport == "tcp" else udp.udp_upstream()
    async with upstream as up, anyio.create_task_group() as tg:
        rec = Reconciler(metrics=Metrics(), edge=EdgePolicy(drain_timeout=0.3), task_group=tg)
        spec = route(transport, up.port)
        await rec.apply(DesiredState(routes={spec.key: spec}))
        live = rec.live[spec.key]
        refs = listener_objects(live, TcpServer if transport == "tcp" else UdpRelay)

        async def stopping() -> None:
            await rec.apply(DesiredState())
            with anyio.fail_after(10):  # the drain deadline (0.3 s) ends what is still open
                while rec.draining:
                    await anyio.sleep(0.01)

        traffic = tcp_traffic if transport == "tcp" else udp_traffic
        await traffic(live, stopping)
        del live
        assert [ref() for ref in refs] == [None, None]
        tg.cancel_scope.cancel()
