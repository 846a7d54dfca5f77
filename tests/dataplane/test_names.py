"""Routes chosen by name on one shared port (`hostnames`), through the reconciler on
loopback, with real TLS on both ends: `openssl s_server` and Python `ssl` upstreams with
certificates of their own, `openssl s_client` and Python `ssl` clients that check the
certificate they get; crafted Minecraft handshakes to two tiny game servers."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.to_thread import run_sync

from labelproxy.metrics import Metrics
from labelproxy.reconciler import Reconciler
from labelproxy.spec import Backend, DesiredState, EdgePolicy, ListenKey, RouteSpec, Sleep
from tests.support.lp import free_port
from tests.support.minecraft import McUpstream, mc_login, mc_status
from tests.support.names import (
    TIMEOUT,
    TlsUpstream,
    bio_handshake,
    client_context,
    make_cert,
    s_client_cn,
    s_server,
    tls_ask,
    two_records,
)
from tests.support.tcp import wait_for
from tests.support.waker import ManualWaker

pytestmark = pytest.mark.anyio

PEEK_TIMEOUT = 0.5


@dataclass
class World:
    port: int
    certs: dict[str, Path]
    ups: dict[str, int]  # upstream name -> port
    metrics: Metrics
    rec: Reconciler

    def spec(self, alias: str, names: tuple[str, ...], upstream: str) -> RouteSpec:
        return RouteSpec(alias, "tcp4", ListenKey("tcp", "127.0.0.1", self.port, names),
                         (Backend("127.0.0.1", self.ups[upstream]),))  # fmt: skip

    async def serve(self, *specs: RouteSpec) -> None:
        await self.rec.apply(DesiredState(routes={s.key: s for s in specs}))

    def rejected(self, reason: str) -> int:
        counters = self.metrics.counters(ListenKey("tcp", "127.0.0.1", self.port))
        return 0 if counters is None else counters.rejected[reason]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("certs")
    return {name: make_cert(directory, name) for name in
            ("a.test", "b.test", "any.wild.test", "fallback.test")}  # fmt: skip


@pytest.fixture(scope="module")
def upstreams(certs: dict[str, tuple[Path, Path]]) -> Iterator[dict[str, int]]:
    """a.test behind `openssl s_server`, the others behind Python `ssl` servers."""
    with s_server(*certs["a.test"]) as a_port:
        ups = [TlsUpstream(name, *certs[name]) for name in certs if name != "a.test"]
        try:
            yield {"a.test": a_port, **{u.name: u.port for u in ups}}
        finally:
            for up in ups:
                up.close()


@asynccontextmanager
async def world(certs: dict[str, tuple[Path, Path]], ups: dict[str, int]) -> AsyncIterator[World]:
    metrics = Metrics()
    async with anyio.create_task_group() as tg:
        edge = EdgePolicy(drain_timeout=1.0, peek_timeout=PEEK_TIMEOUT)
        rec = Reconciler(metrics=metrics, edge=edge, task_group=tg)
        try:
            yield World(free_port(), {n: c for n, (c, _) in certs.items()}, ups, metrics, rec)
        finally:
            await rec.close_all(drain_timeout=0)
            tg.cancel_scope.cancel()


async def test_names_pick_the_upstream_by_sni_with_wildcard_and_fallback(
    certs: dict[str, tuple[Path, Path]], upstreams: dict[str, int]
) -> None:
    """s_client and Python ssl clients get the certificate of the name they ask for; a
    wildcard takes names below it; an unknown name is closed and counted `no_route` until
    a fallback `*` exists, which then takes it and clients that send no name."""
    async with world(certs, upstreams) as w:
        a = w.spec("a", ("a.test",), "a.test")
        b = w.spec("b", ("b.test",), "b.test")
        wild = w.spec("wild", ("*.wild.test",), "any.wild.test")
        await w.serve(a, b, wild)
        ctx = client_context(*w.certs.values())
        assert await run_sync(s_client_cn, w.port, "a.test") == "a.test"
        assert await run_sync(s_client_cn, w.port, "B.Test.") == "b.test"
        assert await run_sync(tls_ask, w.port, "b.test", ctx) == ("b.test", "b.test:hello")
        assert await run_sync(tls_ask, w.port, "any.wild.test", ctx) == (
            "any.wild.test", "any.wild.test:hello")  # fmt: skip
        wild_ctx = client_context(*w.certs.values())
        wild_ctx.check_hostname = False
        cn, _ = await run_sync(tls_ask, w.port, "x.y.wild.test", wild_ctx)
        assert cn == "any.wild.test"
        assert await run_sync(s_client_cn, w.port, "c.test") == ""
        assert w.rejected("no_route") == 1
        fallback = w.spec("fallback", ("*",), "fallback.test")
        await w.serve(a, b, wild, fallback)
        assert await run_sync(s_client_cn, w.port, "c.test") == "fallback.test"
        assert await run_sync(s_client_cn, w.port, None) == "fallback.test"
        assert await run_sync(s_client_cn, w.port, "a.test") == "a.test"
        assert w.rejected("no_route") == 1
        b_counters = w.metrics.counters(b.key)
        assert b_counters is not None and b_counters.connections_total == 2


async def test_hello_split_slow_silent_garbage_and_nameless(
    certs: dict[str, tuple[Path, Path]], upstreams: dict[str, int]
) -> None:
    """A ClientHello written one byte at a time and one over two TLS records both reach
    their route; a client that sends nothing is closed at the peek deadline while another
    is served meanwhile; 1 MB of garbage is refused at once; a ClientHello without a name
    reaches no route when there is no fallback."""
    async with world(certs, upstreams) as w:
        await w.serve(w.spec("b", ("b.test",), "b.test"),
                      w.spec("wild", ("*.wild.test",), "any.wild.test"))  # fmt: skip

        def bytewise(sock: socket.socket, hello: bytes) -> None:
            for i in range(len(hello)):
                sock.sendall(hello[i : i + 1])
                time.sleep(0.0005)

        def split(sock: socket.socket, hello: bytes) -> None:
            sock.sendall(two_records(hello))

        assert await run_sync(bio_handshake, w.port, "b.test", bytewise) == "b.test:split"
        assert await run_sync(bio_handshake, w.port, "q.wild.test", split) == (
            "any.wild.test:split")  # fmt: skip

        def silent() -> float:
            with socket.create_connection(("127.0.0.1", w.port), timeout=TIMEOUT) as sock:
                began = time.monotonic()
                assert tls_ask(w.port, "b.test", client_context(w.certs["b.test"]))[0] == (
                    "b.test")  # served while the silent client waits  # fmt: skip
                assert sock.recv(1) == b""
                return time.monotonic() - began

        waited = await run_sync(silent)
        assert PEEK_TIMEOUT * 0.8 <= waited < PEEK_TIMEOUT + 2
        assert w.rejected("peek_timeout") == 1

        def garbage() -> None:
            with socket.create_connection(("127.0.0.1", w.port), timeout=TIMEOUT) as sock:
                with suppress(OSError):  # refused after the first bytes: a reset is fine
                    sock.sendall(os.urandom(1 << 20))
                with suppress(ConnectionResetError):
                    assert sock.recv(1) == b""

        await run_sync(garbage)
        assert w.rejected("peek_invalid") == 1
        assert await run_sync(s_client_cn, w.port, None) == ""
        assert w.rejected("no_route") == 1


async def test_minecraft_hostnames_reach_their_servers(caplog: pytest.LogCaptureFixture) -> None:
    """Two game servers behind one port: the handshake's server address (with a Forge
    `\\0FML2\\0` suffix, any case) picks the server; a status ping and a login both work;
    the access log names the route and the name read."""
    caplog.set_level(logging.INFO, logger="labelproxy.access")
    one, two = McUpstream("server one"), McUpstream("server two")
    try:
        async with world({}, {"one": one.port, "two": two.port}) as w:
            await w.serve(w.spec("one", ("one.mc.test",), "one"),
                          w.spec("two", ("two.mc.test",), "two"))  # fmt: skip
            assert await run_sync(mc_status, w.port, "one.mc.test") == "server one"
            assert await run_sync(mc_status, w.port, "Two.MC.test.\0FML2\0") == "server two"
            assert await run_sync(mc_login, w.port, "two.mc.test\0FML3\0", "steve") == "steve"
            assert await run_sync(mc_login, w.port, "one.mc.test", "alex") == "alex"
            assert two.addresses[0] == b"Two.MC.test.\0FML2\0"  # relayed unchanged

            def logged() -> set[tuple[str, str]]:
                return {(r.__dict__["route"], r.__dict__["server_name"]) for r in caplog.records
                        if getattr(r, "server_name", "")}  # fmt: skip

            await wait_for(lambda: len(logged()) == 3)
            assert logged() == {("one", "one.mc.test"), ("two", "Two.MC.test."),
                                ("two", "two.mc.test")}  # fmt: skip
    finally:
        one.close()
        two.close()


async def test_a_sleeping_game_server_behind_a_shared_port_wakes_on_its_handshake() -> None:
    """`wake_on: data` on a route chosen by name: the handshake the shared listener read is
    the data that wakes the container (the client then waits for an answer and sends
    nothing more); only the named route's container is asked, and its client is served on
    the same connection once awake."""
    waker = ManualWaker()
    one, two = McUpstream("server one"), McUpstream("server two")
    try:
        async with world({}, {"one": one.port, "two": two.port}) as w:
            w.rec.shared.waker = waker
            sleep = Sleep("c1", "game-one", idle_timeout=60.0, wake_timeout=10.0,
                          wake_on="data")  # fmt: skip
            sleepy = w.spec("one", ("one.mc.test",), "one")
            sleepy = replace(sleepy, options=replace(sleepy.options, sleep=sleep))
            await w.serve(sleepy, w.spec("two", ("two.mc.test",), "two"))
            async with anyio.create_task_group() as tg:
                answers: list[str] = []

                async def ask() -> None:
                    answers.append(await run_sync(mc_status, w.port, "one.mc.test"))

                tg.start_soon(ask)
                await wait_for(lambda: waker.requests == 1)
                assert one.addresses == []  # held: nothing dialled while it sleeps
                assert await run_sync(mc_status, w.port, "two.mc.test") == "server two"
                waker.wake()
            assert answers == ["server one"] and waker.holding == 0
    finally:
        one.close()
        two.close()
