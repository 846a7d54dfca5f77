"""PROXY protocol both ways, with real HAProxy on loopback, and hostile headers.

(a) labelproxy sends v1/v2 upstream to HAProxy (`accept-proxy`), which logs the client
address it was told: the original client's. (b) HAProxy (`send-proxy`/`send-proxy-v2`) in
front of labelproxy (accept on): labelproxy's upstream, told with v1, sees the original client.
Untrusted, truncated, oversized, slow headers close only their own connection.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from labelproxy.spec import EdgePolicy
from labelproxy.streams.proxyproto import (
    HeaderError,
    HeaderParser,
    build_dgram_header,
    build_header,
    parse_dgram,
)
from tests.support.ports import free_port
from tests.support.tcp import (
    DEADLINE,
    connect,
    ping,
    recv_exactly,
    recv_until_eof,
    running_route,
    tcp_spec,
    upstream,
    wait_for,
)

pytestmark = pytest.mark.anyio
TRUST_LOCAL = EdgePolicy(
    accept_proxy_protocol="required",
    trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
    proxy_header_timeout=1.0,
)
needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy missing")


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": True})


# -- the framing, table style ------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(
    ("source", "dest"),
    [
        (("10.1.2.3", 4000), ("192.168.0.1", 80)),
        (("2001:db8::1", 4000), ("2001:db8::2", 443)),
        (("::ffff:10.1.2.3", 4000), ("10.0.0.1", 22)),  # mapped: carried as IPv4
    ],
)
def test_built_headers_parse_back_with_the_bytes_after_them(
    version: str, source: tuple[str, int], dest: tuple[str, int]
) -> None:
    header = build_header(version, source, dest)  # type: ignore[arg-type]
    parser = HeaderParser()
    parsed = None
    for i in range(len(header)):  # byte by byte: incomplete until the last one
        assert parsed is None
        parsed = parser.feed(header[i : i + 1])
    assert parsed is None or parsed.rest == b""
    parsed = HeaderParser().feed(header + b"payload")
    assert parsed is not None
    assert parsed.source == (source[0].removeprefix("::ffff:"), source[1])
    assert parsed.rest == b"payload"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n",
        b"PROXY BOGUS\r\n",
        b"PROXY " + b"A" * 200,
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff" + b"\x00" * 100,
    ],
)
def test_bad_headers_are_errors(data: bytes) -> None:
    with pytest.raises(HeaderError):
        HeaderParser().feed(data)


def test_udp_dgram_header_round_trip() -> None:
    data = build_dgram_header(("10.0.0.9", 5353), ("10.0.0.1", 53)) + b"query"
    assert parse_dgram(data) == (("10.0.0.9", 5353), b"query")


# -- HAProxy ----------------------------------------------------------------------------
@asynccontextmanager
async def haproxy(config: str) -> AsyncIterator[anyio.abc.Process]:
    """Run HAProxy in the foreground with `config`; stopped by its PID on exit."""
    with tempfile.TemporaryDirectory(prefix="lp-haproxy-") as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(
            "global\n  maxconn 256\n  log stdout format raw local0\n"
            "defaults\n  mode tcp\n  log global\n  timeout connect 5s\n"
            "  timeout client 10s\n  timeout server 10s\n" + config
        )
        proc = await anyio.open_process(
            ["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            yield proc
        finally:
            proc.terminate()
            with anyio.fail_after(DEADLINE):
                await proc.wait()


async def wait_listening(port: int) -> None:
    with anyio.fail_after(DEADLINE):
        while True:
            try:
                s = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.02)
                continue
            await s.aclose()
            return


async def read_line_with(proc: anyio.abc.Process, needle: str) -> str:
    assert proc.stdout is not None
    buf = b""
    with anyio.fail_after(DEADLINE):
        while True:
            buf += await proc.stdout.receive()
            for line in buf.decode(errors="replace").splitlines():
                if needle in line:
                    return line


@needs_haproxy
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_haproxy_upstream_logs_the_original_client(version: str) -> None:
    hport = free_port()
    async with upstream() as echo:
        config = (
            f"listen up\n  bind 127.0.0.1:{hport} accept-proxy\n"
            f'  log-format "client=%ci:%cp"\n  server echo 127.0.0.1:{echo.port}\n'
        )
        async with haproxy(config) as proc:
            await wait_listening(hport)
            async with running_route(tcp_spec(hport, proxy_protocol=version)) as live:
                stream = await connect(live, local_host="127.0.0.5")
                client_port = stream.extra(anyio.abc.SocketAttribute.local_port)
                async with stream:
                    assert await ping(stream, b"through haproxy") == b"through haproxy"
                    await stream.send_eof()
                    await recv_until_eof(stream)
                line = await read_line_with(proc, "client=127.0.0.5")
                assert line.strip() == f"client=127.0.0.5:{client_port}"


class HeaderRecorder:
    """An upstream that reads labelproxy's PROXY header, records the source, then echoes."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, int] | None] = []

    async def __call__(self, stream: anyio.abc.SocketStream) -> None:
        parser = HeaderParser()
        async with stream:
            parsed = None
            while parsed is None:
                parsed = parser.feed(await stream.receive())
            self.sources.append(parsed.source)
            if parsed.rest:
                await stream.send(parsed.rest)
            try:
                async for chunk in stream:
                    await stream.send(chunk)
            except (anyio.BrokenResourceError, OSError):
                pass


@needs_haproxy
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
async def test_haproxy_in_front_passes_the_original_client_through(send: str) -> None:
    rec = HeaderRecorder()
    hport = free_port()
    async with (
        upstream(rec) as up,
        running_route(tcp_spec(up.port, proxy_protocol="v1"), TRUST_LOCAL) as live,
    ):
        lp_port = live.bound[0][1]
        config = f"listen front\n  bind 127.0.0.1:{hport}\n  server lp 127.0.0.1:{lp_port} {send}\n"
        async with haproxy(config):
            await wait_listening(hport)
            with anyio.fail_after(DEADLINE):
                stream = await anyio.connect_tcp("127.0.0.1", hport, local_host="127.0.0.7")
            client_port = stream.extra(anyio.abc.SocketAttribute.local_port)
            async with stream:
                assert await ping(stream, b"hello") == b"hello"
        assert ("127.0.0.7", client_port) in rec.sources


# -- hostile or missing headers ---------------------------------------------------------
async def raw(live: Any, data: bytes, *, local_host: str | None = None) -> anyio.abc.SocketStream:
    stream = await connect(live, local_host=local_host)
    if data:
        await stream.send(data)
    return stream


async def test_header_then_payload_is_relayed_and_the_carried_address_used() -> None:
    rec = HeaderRecorder()
    async with (
        upstream(rec) as up,
        running_route(tcp_spec(up.port, proxy_protocol="v2"), TRUST_LOCAL) as live,
    ):
        header = build_header("v1", ("203.0.113.9", 5555), ("127.0.0.1", 1))
        stream = await raw(live, header + b"first bytes")
        async with stream:
            assert await recv_exactly(stream, 11) == b"first bytes"
        assert rec.sources == [("203.0.113.9", 5555)]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"PROXY TCP4 1.2.3", id="truncated"),
        pytest.param(b"\x00garbage" * 12_800, id="100KB-garbage"),
        pytest.param(b"PROXY " + b"x" * 100_000, id="100KB-v1-line"),
        pytest.param(b"hello, no header", id="missing-when-required"),
    ],
)
async def test_bad_header_closes_only_that_connection(bad: bytes) -> None:
    async with upstream() as up, running_route(tcp_spec(up.port), TRUST_LOCAL) as live:
        good = await raw(live, build_header("v1", ("198.51.100.1", 1), ("127.0.0.1", 2)))
        async with good:
            assert await ping(good) == b"ping"
            victim = await raw(live, bad)
            async with victim:
                assert await recv_until_eof(victim) == b""
            assert await ping(good) == b"ping"
        await wait_for(lambda: live.counters.rejected["proxy_header"] == 1)
        assert len(up.peers) == 1  # the bad one never reached the upstream


async def test_one_byte_writes_within_the_deadline_work_and_beyond_it_fail() -> None:
    async with upstream() as up, running_route(tcp_spec(up.port), TRUST_LOCAL) as live:
        header = build_header("v2", ("198.51.100.1", 1), ("127.0.0.1", 2))
        quick = await raw(live, b"")
        async with quick:
            for i in range(len(header)):
                await quick.send(header[i : i + 1])
            assert await ping(quick) == b"ping"
        slow = await raw(live, b"")
        async with slow:
            await slow.send(header[:3])
            assert await recv_until_eof(slow) == b""  # closed at the 1 s deadline
        # counted on the data-plane thread, which may run it just after the close
        await wait_for(lambda: live.counters.rejected["proxy_header"] == 1)


async def test_header_from_an_untrusted_client_is_refused() -> None:
    edge = EdgePolicy(
        accept_proxy_protocol="optional",
        trusted_proxies=(ipaddress.ip_network("127.0.0.2/32"),),
    )
    async with upstream() as up, running_route(tcp_spec(up.port), edge) as live:
        plain = await raw(live, b"")
        async with plain:
            assert await ping(plain) == b"ping"  # untrusted without header: served
            liar = await raw(live, build_header("v1", ("1.1.1.1", 1), ("2.2.2.2", 2)))
            async with liar:
                assert await recv_until_eof(liar) == b""
            assert await ping(plain) == b"ping"
        await wait_for(lambda: live.counters.rejected["proxy_header"] == 1)


async def test_optional_serves_a_trusted_peer_without_header() -> None:
    edge = EdgePolicy(
        accept_proxy_protocol="optional",
        trusted_proxies=TRUST_LOCAL.trusted_proxies,
        proxy_header_timeout=1.0,
    )
    async with upstream() as up, running_route(tcp_spec(up.port), edge) as live:
        stream = await raw(live, b"")
        async with stream:
            assert await ping(stream, b"no header here") == b"no header here"
        assert live.counters.rejected["proxy_header"] == 0


# -- bounded peeks: a client that has not (yet) sent a whole signature ---------------------
BANNER = b"SSH-2.0-OpenSSH_9.6\r\n"


async def server_first(stream: anyio.abc.SocketStream) -> None:
    """An upstream whose protocol starts with the server (SSH, SMTP): banner, then echo."""
    async with stream:
        try:
            await stream.send(BANNER)
            async for chunk in stream:
                await stream.send(chunk)
        except (anyio.BrokenResourceError, OSError):
            pass


async def test_optional_trusted_client_of_a_server_first_protocol_gets_the_banner() -> None:
    """A trusted client in `optional` mode that sends nothing is not held for the header
    timeout (5 s): the upstream is dialled once the short peek finds no signature."""
    edge = EdgePolicy(
        accept_proxy_protocol="optional",
        trusted_proxies=TRUST_LOCAL.trusted_proxies,
        proxy_header_timeout=5.0,
    )
    async with upstream(server_first) as up, running_route(tcp_spec(up.port), edge) as live:
        stream = await raw(live, b"")
        async with stream:
            with anyio.fail_after(edge.proxy_header_timeout / 2):
                assert await recv_exactly(stream, len(BANNER)) == BANNER
            assert await ping(stream, b"client hello") == b"client hello"
        assert live.counters.rejected["proxy_header"] == 0


@pytest.mark.parametrize(
    "trusted",
    [pytest.param("127.0.0.2/32", id="untrusted"), pytest.param("127.0.0.1/32", id="trusted")],
)
async def test_a_pause_after_a_signature_prefix_relays_those_bytes(trusted: str) -> None:
    """`PRO` and then nothing: not a header. The bytes reach the upstream unchanged (here:
    come back from the echo) instead of being held until the client sends more."""
    edge = EdgePolicy(
        accept_proxy_protocol="optional",
        trusted_proxies=(ipaddress.ip_network(trusted),),
        proxy_header_timeout=5.0,
    )
    async with upstream() as up, running_route(tcp_spec(up.port), edge) as live:
        stream = await raw(live, b"PRO")
        async with stream:
            with anyio.fail_after(edge.proxy_header_timeout / 2):
                assert await recv_exactly(stream, 3) == b"PRO"
            assert await ping(stream, b"FILE please") == b"FILE please"
        assert live.counters.rejected["proxy_header"] == 0


async def test_optional_header_paused_after_its_signature_is_still_read() -> None:
    """Once the signature is complete it is a header: a pause longer than the peek does not
    turn it into payload (the rest has the header timeout)."""
    rec = HeaderRecorder()
    edge = EdgePolicy(
        accept_proxy_protocol="optional",
        trusted_proxies=TRUST_LOCAL.trusted_proxies,
        proxy_header_timeout=5.0,
    )
    async with (
        upstream(rec) as up,
        running_route(tcp_spec(up.port, proxy_protocol="v1"), edge) as live,
    ):
        header = build_header("v1", ("203.0.113.9", 5555), ("127.0.0.1", 1))
        stream = await raw(live, header[:10])
        async with stream:
            await anyio.sleep(0.5)  # the pause under test, longer than the peek
            await stream.send(header[10:] + b"payload")
            assert await recv_exactly(stream, 7) == b"payload"
        assert rec.sources == [("203.0.113.9", 5555)]
