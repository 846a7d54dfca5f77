"""The runtime built in the test process: start -> route -> drain.

A `Runtime` with a routes file and no engine is started with `task_group.start` (it reports
started once the first snapshot is applied), a real client talks through its route to a
test-owned upstream, then `stop` (what the first SIGTERM does) closes the listener while the
open connection keeps flowing, and `serve` returns 0 as soon as that connection ends, well
before the drain deadline.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest

from labelproxy.runtime import Runtime
from labelproxy.settings import Settings
from labelproxy.spec import ListenKey
from tests.support.lp import free_port, write_routes
from tests.support.tcp import upstream

pytestmark = pytest.mark.anyio

DRAIN_TIMEOUT = 60.0  # far beyond the test's own deadline: the drain must end on its own
DEADLINE = 15.0


@pytest.fixture(autouse=True)
def _unfreeze_gc() -> Iterator[None]:
    """The runtime freezes what start-up allocated (gc.freeze) once ready; give the test
    process its collector back."""
    yield
    gc.unfreeze()


async def _echo(stream: anyio.abc.SocketStream, data: bytes) -> bytes:
    await stream.send(data)
    received = b""
    while len(received) < len(data):
        received += await stream.receive()
    return received


async def test_runtime_starts_routes_and_drains_an_open_connection(tmp_path: Path) -> None:
    routes_file = tmp_path / "routes.yml"
    listen_port = free_port()
    key = ListenKey("tcp", "127.0.0.1", listen_port)
    settings = Settings(
        docker_host="none",
        routes_file=routes_file,
        http_addr=f"127.0.0.1:{free_port()}",
        drain_timeout=DRAIN_TIMEOUT,
        forwarding="relay",  # the kernel path only runs in a namespace a test made
    )
    exit_status: list[int] = []

    async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        exit_status.append(await runtime.serve(task_status=task_status))

    async with upstream() as up:
        route = {"scheme": "tcp4", "bind": "127.0.0.1", "port": f"{listen_port}:{up.port}",
                 "host": "127.0.0.1"}  # fmt: skip
        write_routes(routes_file, {"web": route})
        runtime = Runtime(settings)
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                await tg.start(serve)  # returns once ready: the route is listening
                assert runtime.ready()
                client = await anyio.connect_tcp("127.0.0.1", listen_port)
                assert await _echo(client, b"before the drain") == b"before the drain"
                assert runtime.reconciler is not None
                live = runtime.reconciler.live[key]

                runtime.stop()
                await live.listener_closed.wait()
                with pytest.raises(OSError):  # no new connection once draining
                    await anyio.connect_tcp("127.0.0.1", listen_port)
                # the open connection is not cut: it keeps relaying until it ends
                assert await _echo(client, b"during the drain") == b"during the drain"
                counters = runtime.metrics.counters(key)
                assert counters is not None
                assert counters.connections_total == 1
                assert counters.bytes_in == counters.bytes_out == 32
                assert exit_status == []
                await client.aclose()
            # the task group ends when serve returns: once the last connection ended
    assert exit_status == [0]
