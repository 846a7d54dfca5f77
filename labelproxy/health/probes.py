"""Running one check against one backend, with a deadline: `probe(check, host=, port=, transport=)`.

- `tcp`: a connect (then a plain close).
- `send_expect`: over TCP, connect, send `check.send` (if any) and read until the answer
  satisfies `check.expect`, the peer closes, or `MAX_ANSWER` bytes came without a match; over
  UDP, send the datagram and wait for one that matches.
- the named probes of `protocols`: their request, then their judge, over TCP or UDP.

The whole check runs under `check.timeout` (connect, send and answer together); a check past
it is a `timeout`, any other failure (refused, reset, closed early, a wrong answer) a `fail`
with a one-line detail. Sockets are plain non-blocking ones awaited with
`anyio.wait_readable`/`wait_writable`: a check is a handful of syscalls and no stream objects
(1,000 routes of default checks are 200 checks a second on the control loop, whose GIL the
TCP data loop shares). A UDP socket is connected, so a port with nothing behind it fails at
once on the ICMP "port unreachable" (ECONNREFUSED) instead of waiting out the timeout. Host
names are resolved by `anyio.getaddrinfo` (a worker thread), IP literals directly. Each probe
closes its socket before returning, also when cancelled (a backend that left).

Loops: a backend whose address (a host name, resolved for each check) is one of labelproxy's
own listeners is not dialled, as the relay does not dial it: the check fails at once with a
`loop:` detail, and no check traffic goes round the loop.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from labelproxy.health.protocols import (
    MAX_ANSWER,
    MQTT_DISCONNECT,
    Exchange,
    Verdict,
    exchange_for,
    preview,
)
from labelproxy.healthcheck import HealthCheck, Result, Transport, render_seconds

logger = logging.getLogger(__name__)

_UDP_BUFFER = 65535

# (transport, IP address, port) -> the listener of labelproxy's own a dial there lands on,
# or None (`streams.shared.OwnListeners.lookup`, handed over by the runtime)
OwnLookup = Callable[[Transport, str, int], object | None]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one check: `pass`, `fail` or `timeout`, a short detail, its duration."""

    result: Result
    detail: str
    duration: float

    @property
    def passed(self) -> bool:
        return self.result == "pass"


class _CheckFailedError(Exception):
    """A check failed for a reason given by the message (not an OSError)."""


async def probe(
    check: HealthCheck, *, host: str, port: int, transport: Transport, own: OwnLookup | None = None
) -> ProbeResult:
    """Run `check` once against `host:port`; never raises except on cancellation. With
    `own`, an address it names as one of labelproxy's own listeners is not dialled: the
    check fails at once with a `loop:` detail (a check must not go round a loop)."""
    if not check.active:
        raise ValueError(f"healthcheck={check.kind} has no probe")
    started = time.monotonic()
    detail = ""
    result: Result = "timeout"
    with anyio.move_on_after(check.timeout):
        try:
            detail = await _run(check, host=host, port=port, transport=transport, own=own)
            result = "pass"
        except _CheckFailedError as exc:
            detail, result = str(exc), "fail"
        except OSError as exc:
            detail, result = describe_os_error(exc), "fail"
    if result == "timeout":
        detail = f"no answer within {render_seconds(check.timeout)}"
    return ProbeResult(result, detail, time.monotonic() - started)


def describe_os_error(exc: BaseException) -> str:
    """`Connection refused`, `No route to host`...: the errno's text, else the message (for
    anyio's "All connection attempts failed", the text of its first cause)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return f"{seen.strerror} (name resolution)"
        if isinstance(seen, OSError) and seen.errno is not None:
            return os.strerror(seen.errno)
        if isinstance(seen, BaseExceptionGroup) and seen.exceptions:
            seen = seen.exceptions[0]
            continue
        seen = seen.__cause__
    return str(exc) or type(exc).__name__


async def _run(
    check: HealthCheck, *, host: str, port: int, transport: Transport, own: OwnLookup | None
) -> str:
    """The detail of a passed check; raises `_CheckFailedError`/`OSError` for a failed one."""
    if check.kind == "tcp":
        (await _connect(host, port, own)).close()
        return "connected"
    if check.kind == "send_expect":
        exchange = Exchange(check.send, _expect_judge(check, datagram=transport == "udp"))
        farewell = b""
    else:
        exchange = exchange_for(check.kind, host=host, port=port, transport=transport)
        farewell = MQTT_DISCONNECT if check.kind == "mqtt" else b""
    if transport == "udp":
        return await _udp_exchange(exchange, host=host, port=port, own=own)
    return await _tcp_exchange(exchange, host=host, port=port, farewell=farewell, own=own)


def _expect_judge(check: HealthCheck, *, datagram: bool) -> Callable[[bytes], Verdict | None]:
    """Over TCP a non-matching answer may still grow into a match (None: read more); a
    datagram is the whole answer."""

    def judge(answer: bytes) -> Verdict | None:
        if check.matches(answer):
            return Verdict(True, "expected answer")
        return Verdict(False, f"unexpected answer: {preview(answer)}") if datagram else None

    return judge


@functools.lru_cache(maxsize=4096)
def literal_family(host: str) -> int | None:
    """AF_INET/AF_INET6 for an IP literal (zone allowed), None for a host name."""
    try:
        version = ipaddress.ip_address(host.split("%", 1)[0]).version
    except ValueError:
        return None
    return socket.AF_INET if version == 4 else socket.AF_INET6


async def _address(
    host: str, port: int, kind: socket.SocketKind, own: OwnLookup | None
) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr): an IP literal at once, a host name through `anyio.getaddrinfo`;
    `_CheckFailedError` when `own` says the address is one of labelproxy's listeners."""
    family = literal_family(host)
    if family is not None:
        found: tuple[int, tuple[Any, ...]] = (family, (host, port))
    else:
        infos = await anyio.getaddrinfo(host, port, type=kind)
        if not infos:
            raise _CheckFailedError(f"{host} did not resolve")
        found = infos[0][0], infos[0][4]
    if own is not None:
        transport: Transport = "tcp" if kind == socket.SOCK_STREAM else "udp"
        listener = own(transport, str(found[1][0]), port)
        if listener is not None:
            raise _CheckFailedError(
                f"loop: {host}:{port} is labelproxy's own listener {listener} (not dialled)"
            )
    return found


async def _connect(host: str, port: int, own: OwnLookup | None) -> socket.socket:
    """A connected non-blocking TCP socket (the caller closes it)."""
    family, address = await _address(host, port, socket.SOCK_STREAM, own)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await anyio.wait_writable(sock)


async def _tcp_exchange(
    exchange: Exchange, *, host: str, port: int, farewell: bytes, own: OwnLookup | None
) -> str:
    with await _connect(host, port, own) as sock:
        await _send_all(sock, exchange.request)
        answer = b""
        while True:
            await anyio.wait_readable(sock)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                if not answer:
                    raise _CheckFailedError("closed without an answer")
                raise _CheckFailedError(f"closed after an unexpected answer: {preview(answer)}")
            answer += chunk
            verdict = exchange.judge(answer)
            if verdict is None and len(answer) >= MAX_ANSWER:
                verdict = Verdict(False, f"no expected answer in {len(answer)} bytes")
            if verdict is None:
                continue
            if not verdict.up:
                raise _CheckFailedError(verdict.detail)
            if farewell:
                with contextlib.suppress(OSError):
                    sock.send(farewell)
            return verdict.detail


async def _udp_exchange(
    exchange: Exchange, *, host: str, port: int, own: OwnLookup | None
) -> str:
    family, address = await _address(host, port, socket.SOCK_DGRAM, own)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(address)
        sock.send(exchange.request)
        while True:
            await anyio.wait_readable(sock)
            try:
                datagram = sock.recv(_UDP_BUFFER)
            except BlockingIOError:
                continue
            except ConnectionRefusedError:
                raise _CheckFailedError(os.strerror(errno.ECONNREFUSED)) from None
            verdict = exchange.judge(datagram)
            if verdict is None:
                continue  # someone else's answer: keep waiting (until the timeout)
            if not verdict.up:
                raise _CheckFailedError(verdict.detail)
            return verdict.detail
