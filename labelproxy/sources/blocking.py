"""Blocking calls on daemon threads, for a client whose calls can hang (docker-py talking to a
frozen engine).

`run_blocking(fn, *args)` runs `fn` on a daemon thread of its own and returns its result (or
raises its exception) to the awaiting task; the thread hands the outcome back only through
`anyio.from_thread`. Cancelling the awaiting task abandons the thread: it finishes on its own
(its client's timeouts bound it) and its outcome is dropped. Unlike anyio's worker threads,
which the interpreter joins at exit, an abandoned call here never holds up the process's exit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def run_blocking(fn: Callable[..., T], *args: Any, name: str = "labelproxy-blocking") -> T:
    """`fn(*args)` on a daemon thread; see the module doc."""
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    outcome: list[tuple[bool, Any]] = []

    def settle(ok: bool, value: Any) -> None:
        outcome.append((ok, value))
        done.set()

    def work() -> None:
        try:
            result: tuple[bool, Any] = (True, fn(*args))
        except BaseException as exc:  # handed to the awaiting task
            result = (False, exc)
        try:
            anyio.from_thread.run_sync(settle, *result, token=token)
        except RuntimeError:  # the event loop is gone: nobody waits any more
            logger.debug("%s finished after its event loop ended", name)

    threading.Thread(target=work, name=name, daemon=True).start()
    await done.wait()
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result
