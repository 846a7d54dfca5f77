"""Is the Docker engine still answering? A ping with a deadline, and a watch that pings on an
interval while discovery is connected.

An engine that stops answering (SIGSTOP, overload, a TCP peer gone without a reset) keeps its
event stream open and silent, so only asking tells. `probe` is any client with a blocking
`ping()` (docker-py's `APIClient`, built by `discovery` with the deadline as its timeout); the
call runs on a daemon thread and is abandoned when the deadline passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio

from labelproxy.sources.blocking import run_blocking

logger = logging.getLogger(__name__)


class EngineUnresponsiveError(Exception):
    """The engine did not answer a ping in time."""


async def ping(probe: Any, *, deadline: float) -> None:
    """Return once `probe.ping()` answers; `EngineUnresponsiveError` after `deadline` seconds
    (a failed ping raises what the client raised)."""
    with anyio.move_on_after(deadline) as waited:
        await run_blocking(probe.ping, name="labelproxy-docker-ping")
    if waited.cancelled_caught:
        raise EngineUnresponsiveError(f"no answer to a ping within {deadline:g}s")


async def watch(
    probe: Any,
    *,
    interval: float,
    deadline: float,
    errors: tuple[type[BaseException], ...],
    on_lost: Callable[[str], None],
) -> None:
    """Ping every `interval`; call `on_lost(reason)` and return at the first missed deadline
    or ping failing with one of `errors`."""
    caught: tuple[type[BaseException], ...] = (EngineUnresponsiveError, *errors)
    while True:
        await anyio.sleep(interval)
        try:
            await ping(probe, deadline=deadline)
        except caught as exc:
            logger.debug("engine ping failed: %s", exc)
            on_lost(f"{type(exc).__name__}: {exc}")
            return
