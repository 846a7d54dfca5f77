"""The small HTTP server on `LABELPROXY_HTTP_ADDR`: /metrics, /healthz, /readyz, /routes.

HTTP/1.1 with `Connection: close`, GET and HEAD only. It knows nothing of Docker, listeners or
metrics: the runtime passes in callables that snapshot the current state.

Whoever can reach the port must not be able to get the process marked unhealthy, or make it
grow, so:
- a connection has `header_deadline` seconds (in all) to deliver its request head, and holds
  nothing but its socket until then; when more than `max_waiting` connections are waiting
  for their request, the one that has waited longest is closed;
- /healthz, /readyz and / are answered at once, whatever else is going on;
- /metrics and /routes (documents) are written on a worker thread from a snapshot taken on
  the event loop, and requests that arrive while a document is being written wait for that
  writing and share its bytes; at most `max_documents` such requests are in progress, the
  next ones get a quick `503`;
- a response is sent in slices, so a slow reader holds one slice of buffer, not a copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import anyio
import anyio.abc

from labelproxy.streams.sockets import RESOURCE_ERRNOS, accept_backoff

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
SEND_SLICE = 64 * 1024
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
JSON = "application/json"


class Document(Protocol):
    """A snapshot taken on the event loop whose `encode` (the response body) may run on any
    thread."""

    def encode(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class HttpState:
    """What the endpoints read: readiness, and a snapshot of /routes and of /metrics (each
    taken on the event loop, encoded on a worker thread)."""

    ready: Callable[[], bool]
    routes: Callable[[], Document]
    metrics: Callable[[], Document]
    engine: Callable[[], str] | None = None  # the /readyz detail: connected, disconnected, off


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Deadlines (seconds) and caps of the HTTP server; see the module docstring."""

    header_deadline: float = 3.0
    send_deadline: float = 10.0
    render_deadline: float = 30.0
    max_waiting: int = 512
    max_documents: int = 64


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


def handle(path: str, state: HttpState) -> Response:
    """The cheap endpoints (a path without its query): answered on the event loop at once."""
    if path == "/healthz":
        return Response(200, b"ok\n")
    if path == "/readyz":
        status, text = (200, "ready") if state.ready() else (503, "not ready")
        if state.engine is not None:
            text += f"\ndocker: {state.engine()}"
        return Response(status, f"{text}\n".encode())
    if path == "/":
        return Response(200, b"labelproxy: /metrics /healthz /readyz /routes\n")
    return Response(404, b"not found\n")


@dataclass(eq=False, slots=True)
class _Rendering:
    done: anyio.Event = field(default_factory=anyio.Event)
    body: bytes | None = None  # None: the rendering failed


class _SharedRender:
    """One document (/metrics or /routes), written on a worker thread from a snapshot that
    `snapshot` takes on the event loop (it returns the function that writes the body).

    A request that arrives while a rendering is in progress waits for it and gets the same
    bytes, instead of starting another: what it shows was read at most one rendering earlier
    than the request, and a burst of scrapes costs one rendering and one body, not one each.
    The rendering runs in `task_group`, so a client that leaves does not cancel it for others.
    """

    def __init__(
        self, snapshot: Callable[[], Callable[[], bytes]], *, task_group: anyio.abc.TaskGroup
    ) -> None:
        self._snapshot = snapshot
        self._tg = task_group
        self._current: _Rendering | None = None

    async def get(self) -> bytes | None:
        """The body (None if rendering it failed: logged)."""
        rendering = self._current
        if rendering is None:
            rendering = self._current = _Rendering()
            self._tg.start_soon(self._render, rendering)
        await rendering.done.wait()
        return rendering.body

    async def _render(self, rendering: _Rendering) -> None:
        try:
            write = self._snapshot()
            rendering.body = await anyio.to_thread.run_sync(write)
        except Exception:
            logger.exception("HTTP document rendering failed", extra={"action": "render"})
        finally:
            self._current = None
            rendering.done.set()


class _Waiting:
    """The cancel scopes of connections still waiting for their request head, oldest first.
    Over `cap` of them, the oldest is cancelled (its connection closed)."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._scopes: dict[anyio.CancelScope, None] = {}

    def add(self, scope: anyio.CancelScope) -> None:
        self._scopes[scope] = None
        while len(self._scopes) > self._cap:
            oldest = next(iter(self._scopes))
            del self._scopes[oldest]
            oldest.cancel()
            logger.debug("HTTP: over %d idle connections, closed the oldest", self._cap)

    def discard(self, scope: anyio.CancelScope) -> None:
        self._scopes.pop(scope, None)


def _encoder(take: Callable[[], Document]) -> Callable[[], bytes]:
    """Take a snapshot now (on the event loop); the returned function writes its body."""
    return take().encode


class _Server:
    """Per-server state: the documents, the waiting connections, the documents in progress."""

    def __init__(
        self, state: HttpState, limits: HttpLimits, task_group: anyio.abc.TaskGroup
    ) -> None:
        self.state = state
        self.limits = limits
        self.waiting = _Waiting(limits.max_waiting)
        metrics = _SharedRender(partial(_encoder, state.metrics), task_group=task_group)
        routes = _SharedRender(partial(_encoder, state.routes), task_group=task_group)
        self.documents: dict[str, tuple[_SharedRender, str]] = {
            "/metrics": (metrics, PROMETHEUS_TEXT),
            "/routes": (routes, JSON),
        }
        self.in_progress = 0

    async def serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(self.limits.header_deadline) as scope:
                self.waiting.add(scope)
                try:
                    head = await _read_head(stream)
                finally:
                    self.waiting.discard(scope)
            if scope.cancelled_caught or head == b"":
                return  # no request in time, closed to make room, or by the client
            if head is None:
                await self._send(stream, "GET", Response(413, b"request too large\n"))
                return
            parts = head.split(b"\n", 1)[0].decode("latin-1").split()
            if len(parts) < 2:
                await self._send(stream, "GET", Response(400, b"bad request\n"))
                return
            method, path = parts[0], parts[1].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._send(stream, method, Response(405, b"method not allowed\n"))
            elif path not in self.documents:
                await self._send(stream, method, handle(path, self.state))
            elif self.in_progress >= self.limits.max_documents:
                await self._send(stream, method, Response(503, b"busy: too many scrapes\n"))
            else:
                self.in_progress += 1
                try:
                    await self._send(stream, method, await self._document(path))
                finally:
                    self.in_progress -= 1

    async def _document(self, path: str) -> Response:
        render, content_type = self.documents[path]
        with anyio.move_on_after(self.limits.render_deadline):
            body = await render.get()
            if body is None:
                return Response(500, b"internal error\n")
            return Response(200, body, content_type)
        return Response(503, b"busy: rendering took too long\n")

    async def _send(self, stream: anyio.abc.SocketStream, method: str, response: Response) -> None:
        header = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'OK')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        body = b"" if method == "HEAD" else response.body
        try:
            with anyio.move_on_after(self.limits.send_deadline):
                if len(body) <= SEND_SLICE:
                    await stream.send(header + body)
                    return
                await stream.send(header)
                view = memoryview(body)
                for start in range(0, len(body), SEND_SLICE):
                    # any bytes-like object will do (anyio types it as bytes): no copy
                    await stream.send(view[start : start + SEND_SLICE])  # type: ignore[arg-type]
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


async def _read_head(stream: anyio.abc.ByteStream) -> bytes | None:
    """The request head (b"" if the client closed first); None when it is too large."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST_BYTES:
            return None
        try:
            chunk = await stream.receive(4096)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data
        data += chunk
    return data


async def _accept_loop(
    listener: anyio.abc.SocketListener, server: _Server, tg: anyio.abc.TaskGroup
) -> None:
    """Accept forever; out of descriptors or buffers, back off instead of dying."""
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
        tg.start_soon(server.serve_connection, stream)


async def serve_http(
    *,
    host: str,
    port: int,
    state: HttpState,
    limits: HttpLimits = HttpLimits(),
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoints until cancelled; reports started once bound (raises if not)."""
    multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with multi, anyio.create_task_group() as tg:
        server = _Server(state, limits, tg)
        logger.info("HTTP endpoints listening", extra={"listen": f"{host}:{port}"})
        task_status.started()
        for listener in multi.listeners:
            assert isinstance(listener, anyio.abc.SocketListener)
            tg.start_soon(_accept_loop, listener, server, tg)
