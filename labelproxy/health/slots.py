"""`CheckSlots`: the health checker's one cap on checks in flight, shared by two threads.

The default `tcp` checks run on the check loop's thread (`tcpbatch`), which never waits: it
takes a slot with `try_take`, and when none is free it asks to be told (`notify`) and starts
more when told. The other probes run as tasks on the event loop and wait their turn with
`await take()`. Whoever is done calls `give()`, from either thread: the slot goes straight to
the first task waiting (tasks are served first, in order: the batch, on a thread that never
waits, would otherwise take every slot as it frees), else it is free again and the batch is
told if it asked. A task handed a slot but cancelled before it woke gives it on, so no slot is
lost.

    slots = CheckSlots(64)
    if slots.try_take(): ...            # any thread, never waits
    slots.notify(callback)              # called once (any thread) when a slot is given back
    await slots.take()                  # event loop: waits for a slot
    slots.give()                        # any thread
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable

import anyio

logger = logging.getLogger(__name__)


class CheckSlots:
    """See the module docstring."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a cap of {total} checks in flight")
        self.total = total
        self._free = total
        self._lock = threading.Lock()
        self._notify: Callable[[], None] | None = None  # the batch, waiting for a slot
        self._waiting: deque[Callable[[], None]] = deque()  # tasks: their wake-ups, in order

    @property
    def in_use(self) -> int:
        return self.total - self._free

    def try_take(self) -> bool:
        """Take a slot if one is free (any thread, never waits)."""
        with self._lock:
            if self._free > 0:
                self._free -= 1
                return True
            return False

    def notify(self, callback: Callable[[], None]) -> None:
        """Call `callback` (once, from the thread that frees it) when a slot is given back;
        at once if one is free now."""
        with self._lock:
            if self._free <= 0:
                self._notify = callback
                return
        callback()

    async def take(self) -> None:
        """Wait for a slot and take it (event loop). Tasks waiting are served first, in
        order: a slot given back goes to the first of them directly."""
        aloop = asyncio.get_running_loop()
        event = anyio.Event()

        def wake() -> None:
            aloop.call_soon_threadsafe(event.set)

        with self._lock:
            if self._free > 0:
                self._free -= 1
                return
            self._waiting.append(wake)
        try:
            await event.wait()
        except BaseException:  # cancelled while waiting
            with self._lock:
                granted = wake not in self._waiting  # handed a slot already
                if not granted:
                    self._waiting.remove(wake)
            if granted:
                self.give()  # not wanted any more: to the next in line
            raise

    def give(self) -> None:
        """Give a slot back (any thread): to the first task waiting, else free again, and
        the batch told if it waits for one."""
        with self._lock:
            if self._waiting:
                task: Callable[[], None] | None = self._waiting.popleft()  # it holds it now
                batch = None
            else:
                self._free += 1
                task, batch, self._notify = None, self._notify, None
        for wake in (task, batch):
            if wake is not None:
                with contextlib.suppress(RuntimeError):  # its event loop closed: shutting down
                    wake()
