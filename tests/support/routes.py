"""What the TCP and UDP data-plane helpers share: a route spec, and a route being served.

`route_spec` builds a `RouteSpec` on an ephemeral port; `serving` runs one engine
(`serve_tcp`, `serve_udp`) for a fresh `LiveRoute` for the duration of a block, then closes
it without a drain and waits until it finished. `tests/support/tcp.py` and `udp.py` wrap
them with their transport's defaults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio

from labelproxy.metrics import Metrics
from labelproxy.spec import (
    Backend,
    EdgePolicy,
    ListenKey,
    RouteOptions,
    RouteSpec,
    Scheme,
    transport_of,
)
from labelproxy.streams.hooks import Hook
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.shared import SharedState
from labelproxy.streams.tcp.server import serve_tcp

DEADLINE = 10.0

Serve = Callable[..., Coroutine[Any, Any, None]]


def route_spec(
    alias: str,
    scheme: Scheme,
    listen: tuple[str, int],
    backends: tuple[Backend, ...],
    options: dict[str, Any],
) -> RouteSpec:
    """A route of `scheme` on `listen` (bind, port; port 0: ephemeral) to `backends`."""
    return RouteSpec(
        alias=alias,
        scheme=scheme,
        key=ListenKey(transport_of(scheme), *listen),
        backends=backends,
        options=RouteOptions(**options),
    )


@asynccontextmanager
async def serving(
    spec: RouteSpec,
    *,
    serve: Serve = serve_tcp,
    edge: EdgePolicy | None,
    metrics: Metrics | None,
    shared: SharedState | None,
    extra_hooks: tuple[Hook, ...],
) -> AsyncIterator[LiveRoute]:
    """Serve `spec` with `serve` (a fresh Metrics unless given; `shared`: the global caps
    and own listeners of several routes, default its own); on exit close it without a drain
    and wait until it finished."""
    metrics = metrics or Metrics()
    live = LiveRoute(
        spec,
        counters=metrics.route(spec.alias, spec.key),
        edge=edge or EdgePolicy(),
        shared=shared,
        extra_hooks=extra_hooks,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(serve, live)
        try:
            yield live
        finally:
            live.close(0)
            with anyio.fail_after(DEADLINE):
                await live.finished.wait()
