"""Each probe against the real server (redis-server, dnsmasq, sshd, postgres, mosquitto) run on
loopback, a minecraft status double written here, a closed port and a wrong server."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager

import anyio
import anyio.abc
import pytest

from labelproxy.health.probes import ProbeResult, probe
from labelproxy.healthcheck import HealthCheck, Kind, Transport
from tests.support.lp import free_port
from tests.support.servers import run_dnsmasq, run_mosquitto, run_postgres, run_redis, run_sshd

pytestmark = pytest.mark.anyio

SERVERS = {
    "redis": run_redis,
    "dns": run_dnsmasq,
    "ssh": run_sshd,
    "postgres": run_postgres,
    "mqtt": run_mosquitto,
}


@pytest.fixture(scope="module")
def real_servers() -> Iterator[dict[str, int]]:
    """One of each real server for the module: probe name -> port."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(run()) for name, run in SERVERS.items()}


async def run(
    kind: Kind | HealthCheck, port: int, transport: Transport = "tcp", timeout: float = 3.0
) -> ProbeResult:
    health = kind if isinstance(kind, HealthCheck) else HealthCheck(kind, timeout=timeout)
    with anyio.fail_after(timeout + 2):
        return await probe(health, host="127.0.0.1", port=port, transport=transport)


@pytest.mark.parametrize(
    ("kind", "transport", "detail"),
    [
        ("redis", "tcp", "+PONG"),
        ("dns", "udp", "dns REFUSED"),
        ("dns", "tcp", "dns REFUSED"),
        ("ssh", "tcp", "SSH-2.0-OpenSSH_"),
        ("postgres", "tcp", "postgres (no SSL)"),
        ("mqtt", "tcp", "mqtt CONNACK accepted"),
    ],
)
async def test_named_probe_passes_against_the_real_server(
    real_servers: dict[str, int], kind: Kind, transport: Transport, detail: str
) -> None:
    result = await run(kind, real_servers[kind], transport)
    assert result.result == "pass", result
    assert result.detail.startswith(detail)


@pytest.mark.parametrize(
    ("kind", "transport"),
    [("tcp", "tcp"), ("redis", "tcp"), ("dns", "udp"), ("dns", "tcp"), ("ssh", "tcp"),
     ("postgres", "tcp"), ("mqtt", "tcp"), ("minecraft", "tcp")],
)  # fmt: skip
async def test_probe_fails_fast_on_a_closed_port(kind: Kind, transport: Transport) -> None:
    port = free_port()
    result = await run(kind, port, transport)
    assert (result.result, result.detail) == ("fail", "Connection refused")
    assert result.duration < 1.0  # refused at once (UDP too: ICMP port unreachable)


@asynccontextmanager
async def tcp_server(
    handler: Callable[[anyio.abc.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        yield port
        tg.cancel_scope.cancel()


async def greeter(stream: anyio.abc.SocketStream) -> None:
    """A wrong server: greets like an SMTP server, answers anything with an error, closes."""
    async with stream:
        await stream.send(b"220 mail.example ESMTP\r\n")
        try:
            await stream.receive()
        except anyio.EndOfStream:
            return
        await stream.send(b"500 5.5.2 unrecognised command\r\n")


@pytest.mark.parametrize(
    ("kind", "transport", "result", "detail"),
    [
        ("redis", "tcp", "fail", "not a redis answer: b'220 mail.example ESMTP"),
        ("postgres", "tcp", "fail", "not a postgres answer to SSLRequest: b'220 mail"),
        ("mqtt", "tcp", "fail", "not an MQTT CONNACK: b'220 mail.example"),
        ("minecraft", "tcp", "fail", "not a minecraft status response: b'220 mail"),
        ("dns", "tcp", "fail", "not an answer to our DNS query: b'220 mail"),
        ("ssh", "tcp", "timeout", "no answer within 0.5s"),  # waits for a version line
    ],
)
async def test_named_probe_fails_against_a_wrong_server(
    kind: Kind, transport: Transport, result: str, detail: str
) -> None:
    async with tcp_server(greeter) as port:
        found = await run(kind, port, transport, timeout=0.5)
    assert found.result == result, found
    assert found.detail.startswith(detail), found


async def test_named_probes_fail_against_each_others_servers(
    real_servers: dict[str, int],
) -> None:
    found = {
        "redis->mqtt": await run("redis", real_servers["mqtt"], timeout=0.5),
        "mqtt->redis": await run("mqtt", real_servers["redis"], timeout=0.5),
        "ssh->postgres": await run("ssh", real_servers["postgres"], timeout=0.5),
        "postgres->ssh": await run("postgres", real_servers["ssh"], timeout=0.5),
    }
    assert {name: r.result for name, r in found.items() if r.passed} == {}


@asynccontextmanager
async def udp_echo() -> AsyncIterator[int]:
    """A wrong server for DNS (it echoes the query, QR bit clear) and a send_expect target."""
    sock = await anyio.create_udp_socket(local_host="127.0.0.1", local_port=0)
    port = int(sock.extra(anyio.abc.SocketAttribute.local_port))

    async def serve() -> None:
        async for data, addr in sock:
            await sock.sendto(data, *addr)

    async with sock, anyio.create_task_group() as tg:
        tg.start_soon(serve)
        yield port
        tg.cancel_scope.cancel()


async def test_dns_probe_fails_against_a_udp_echo() -> None:
    async with udp_echo() as port:
        result = await run("dns", port, "udp")
    assert (result.result, result.detail) == ("fail", "not a DNS response (QR bit clear)")


async def test_send_expect_over_udp() -> None:
    async with udp_echo() as port:
        hello = HealthCheck("send_expect", send=b"hello\n", expect=b"hello", timeout=1.0)
        assert (await run(hello, port, "udp")).result == "pass"
        regex = HealthCheck("send_expect", send=b"v=42", expect=rb"^v=\d+$", expect_regex=True)
        assert (await run(regex, port, "udp")).result == "pass"
        wrong = HealthCheck("send_expect", send=b"hello", expect=b"bye", timeout=1.0)
        result = await run(wrong, port, "udp")
    assert (result.result, result.detail) == ("fail", "unexpected answer: b'hello'")


async def test_send_expect_over_tcp_against_redis(real_servers: dict[str, int]) -> None:
    port = real_servers["redis"]
    ping = HealthCheck("send_expect", send=b"PING\r\n", expect=b"+PONG")
    assert (await run(ping, port)).result == "pass"
    regex = HealthCheck("send_expect", send=b"PING\r\n", expect=rb"^\+PONG\r\n$", expect_regex=True)
    assert (await run(regex, port)).result == "pass"
    wrong = HealthCheck("send_expect", send=b"PING\r\n", expect=b"+OK", timeout=0.5)
    result = await run(wrong, port, timeout=0.5)
    assert (result.result, result.detail) == ("timeout", "no answer within 0.5s")  # redis waits


async def test_send_expect_without_send_reads_a_banner(real_servers: dict[str, int]) -> None:
    banner = HealthCheck("send_expect", expect=rb"^SSH-2\.0-OpenSSH", expect_regex=True)
    assert (await run(banner, real_servers["ssh"])).result == "pass"


async def test_timeout_covers_a_silent_server() -> None:
    async def silent(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep(5)

    async with tcp_server(silent) as port:
        result = await run("redis", port, timeout=0.3)
    assert (result.result, result.detail) == ("timeout", "no answer within 0.3s")
    assert 0.25 < result.duration < 1.0


# -- minecraft: a status double that checks what the probe sends ----------------------------
def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Written apart from the probe's own VarInt code, from the protocol's description."""
    result = 0
    for i in range(5):
        byte = data[pos + i]
        result |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return (result - (1 << 32) if result >= 1 << 31 else result), pos + i + 1
    raise ValueError("VarInt too long")


def _write_varint(value: int) -> bytes:
    value &= 0xFFFFFFFF
    out = b""
    while value >= 0x80:
        out += bytes([(value & 0x7F) | 0x80])
        value >>= 7
    return out + bytes([value])


STATUS = {
    "version": {"name": "1.21.4", "protocol": 769},
    "players": {"max": 20, "online": 0},
    "description": {"text": "labelproxy test double"},
}


async def minecraft_double(stream: anyio.abc.SocketStream) -> None:
    """Reads a handshake (next state 1) and a status request; answers the status JSON."""
    async with stream:
        data = b""
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                return
            try:
                length, pos = _read_varint(data, 0)
                if len(data) < pos + length:
                    continue
                packet_id, p = _read_varint(data, pos)
                _protocol, p = _read_varint(data, p)
                address_length, p = _read_varint(data, p)
                p += address_length
                (_port,) = struct.unpack("!H", data[p : p + 2])
                next_state, p = _read_varint(data, p + 2)
                assert (packet_id, next_state, p) == (0, 1, pos + length)
                request = data[pos + length :]
                if len(request) < 2:
                    continue
                assert request == b"\x01\x00"
            except IndexError:
                continue
            body = json.dumps(STATUS).encode()
            payload = b"\x00" + _write_varint(len(body)) + body
            await stream.send(_write_varint(len(payload)) + payload)
            return


async def test_minecraft_probe_against_a_status_double() -> None:
    async with tcp_server(minecraft_double) as port:
        result = await run("minecraft", port)
    assert (result.result, result.detail) == ("pass", "minecraft 1.21.4")


async def test_minecraft_probe_rejects_a_non_json_status() -> None:
    async def broken(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            body = b"not json"
            payload = b"\x00" + _write_varint(len(body)) + body
            await stream.send(_write_varint(len(payload)) + payload)

    async with tcp_server(broken) as port:
        result = await run("minecraft", port)
    assert result.result == "fail"
    assert result.detail.startswith("not a minecraft status response")
