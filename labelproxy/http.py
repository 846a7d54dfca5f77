"""The small HTTP server on `LABELPROXY_HTTP_ADDR`: /metrics, /healthz, /readyz, /routes.

HTTP/1.1 with `Connection: close`, GET and HEAD only, a request-size cap and a read deadline,
so a slow or hostile scraper cannot hold the loop. It knows nothing of Docker or listeners:
the runtime passes in callables that render the current state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from labelproxy.metrics import Metrics
from labelproxy.streams.sockets import RESOURCE_ERRNOS, accept_backoff

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
MAX_CONCURRENT_REQUESTS = 64
READ_DEADLINE = 5.0
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class HttpState:
    """What the endpoints read: readiness and the /routes document."""

    ready: Callable[[], bool]
    routes: Callable[[], object]
    metrics: Metrics
    engine: Callable[[], str] | None = None  # the /readyz detail: connected, disconnected, off


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


def handle(method: str, path: str, state: HttpState) -> Response:
    """Route one request to its endpoint (pure apart from reading state)."""
    if method not in ("GET", "HEAD"):
        return Response(405, b"method not allowed\n")
    path = path.split("?", 1)[0]
    if path == "/metrics":
        return Response(200, state.metrics.render(), PROMETHEUS_TEXT)
    if path == "/healthz":
        return Response(200, b"ok\n")
    if path == "/readyz":
        status, text = (200, "ready") if state.ready() else (503, "not ready")
        if state.engine is not None:
            text += f"\ndocker: {state.engine()}"
        return Response(status, f"{text}\n".encode())
    if path == "/routes":
        body = json.dumps(state.routes(), indent=2, sort_keys=False).encode() + b"\n"
        return Response(200, body, "application/json")
    if path == "/":
        return Response(200, b"labelproxy: /metrics /healthz /readyz /routes\n")
    return Response(404, b"not found\n")


async def _respond(method: str, path: str, state: HttpState) -> Response:
    """`handle`, except that a scrape is written on a worker thread from a snapshot taken
    here: rendering every route's series must not hold up the event loop (UDP relays,
    Docker events) while it runs."""
    if method in ("GET", "HEAD") and path.split("?", 1)[0] == "/metrics":
        snapshot = state.metrics.state()
        body = await anyio.to_thread.run_sync(state.metrics.render, snapshot)
        return Response(200, body, PROMETHEUS_TEXT)
    return handle(method, path, state)


async def _read_head(stream: anyio.abc.ByteStream) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST_BYTES:
            return None
        try:
            chunk = await stream.receive(4096)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data or None
        data += chunk
    return data


async def _serve_one(stream: anyio.abc.SocketStream, state: HttpState) -> None:
    async with stream:
        response: Response | None = None
        method = "GET"
        with anyio.move_on_after(READ_DEADLINE):
            head = await _read_head(stream)
            if head is None:
                response = Response(413, b"request too large\n")
            else:
                request_line = head.split(b"\n", 1)[0].decode("latin-1").strip()
                parts = request_line.split()
                if len(parts) < 2:
                    response = Response(400, b"bad request\n")
                else:
                    method = parts[0]
                    try:
                        response = await _respond(method, parts[1], state)
                    except Exception:
                        logger.exception("HTTP handler failed", extra={"action": parts[1]})
                        response = Response(500, b"internal error\n")
        if response is None:
            return
        header = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'OK')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        payload = header if method == "HEAD" else header + response.body
        try:
            with anyio.move_on_after(READ_DEADLINE):
                await stream.send(payload)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


async def _accept_loop(
    listener: anyio.abc.SocketListener, state: HttpState, tg: anyio.abc.TaskGroup
) -> None:
    """Accept forever; out of descriptors or buffers, back off instead of dying."""
    limiter = anyio.CapacityLimiter(MAX_CONCURRENT_REQUESTS)
    backoff = 0.0
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in RESOURCE_ERRNOS:
                raise
            if not backoff:
                logger.error("HTTP accept failed: %s; backing off", exc, extra={"action": "accept"})
            backoff = accept_backoff(backoff)
            await anyio.sleep(backoff)
            continue
        backoff = 0.0
        if limiter.available_tokens < 1:
            await stream.aclose()  # too many scrapers at once: refuse, do not queue
            continue
        tg.start_soon(_serve_limited, stream, state, limiter)


async def _serve_limited(
    stream: anyio.abc.SocketStream, state: HttpState, limiter: anyio.CapacityLimiter
) -> None:
    async with limiter:
        await _serve_one(stream, state)


async def serve_http(
    *,
    host: str,
    port: int,
    state: HttpState,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoints until cancelled; reports started once bound (raises if not)."""
    multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with multi, anyio.create_task_group() as tg:
        logger.info("HTTP endpoints listening", extra={"listen": f"{host}:{port}"})
        task_status.started()
        for listener in multi.listeners:
            assert isinstance(listener, anyio.abc.SocketListener)
            tg.start_soon(_accept_loop, listener, state, tg)
