"""What counts as a failed dial: only a connect that failed. An upstream that accepts and
then resets the connection (connect succeeded, then RST) is an upstream error of that
connection, not a dial error, even when the reset is already there when the dialer first
looks at the socket.

Real loopback sockets; the upstream is a plain socket in a thread that resets what it accepts.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from labelproxy.streams.hooks import BaseHook, ConnInfo
from labelproxy.streams.tcp import loop as dataloop
from tests.support.tcp import (
    DEADLINE,
    connect,
    recv_until_eof,
    running_route,
    tcp_spec,
    wait_for,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": True})


class ResettingUpstream:
    """Accepts one connection and resets it (SO_LINGER 0); `reset` is set once done."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(DEADLINE)
        self.port = int(self.sock.getsockname()[1])
        self.reset = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        self.reset.set()

    def close(self) -> None:
        self.sock.close()
        self._thread.join(DEADLINE)


@pytest.fixture
def resetting() -> Iterator[ResettingUpstream]:
    up = ResettingUpstream()
    yield up
    up.close()


class HoldLoopUntilReset(BaseHook):
    """Once a connection is admitted (its dial is in flight), keep the data loop busy until
    the upstream has accepted and reset it: the dialer then first sees a reset socket."""

    def __init__(self, up: ResettingUpstream) -> None:
        self.up = up

    def on_open(self, conn: ConnInfo) -> None:
        dataloop.shared().call_soon(self.up.reset.wait, DEADLINE)


async def test_an_upstream_reset_after_connect_is_not_a_dial_error(
    resetting: ResettingUpstream,
) -> None:
    hold = HoldLoopUntilReset(resetting)
    async with running_route(tcp_spec(resetting.port), extra_hooks=(hold,)) as live:
        client = await connect(live)
        async with client:
            await client.send(b"hello")
            assert await recv_until_eof(client) == b""
        assert resetting.reset.is_set()
        await wait_for(lambda: live.counters.connections_active == 0)
        assert live.counters.dial_errors == 0
        assert live.counters.dial_durations.count == 1  # the connect itself succeeded
        assert live.counters.connections_total == 1
