"""One edge-triggered epoll per TCP listener, registered once with the event loop.

Every socket of a listener's connections (the upstream while it connects, then both sides
while relaying) is added once to the listener's `Poller` with IN|OUT|RDHUP|ET and stays
there until it is closed (closing the socket removes it from the epoll set). The event loop
sees a single reader, the epoll fd; its callback drains the ready list and calls
`target.on_event(fd, events)` for each. So an idle connection costs the kernel's epoll
entry and one dict slot, no event-loop handle, and a relay never re-arms readiness (no
add_reader/remove_reader churn): edge-triggered readiness is tracked in the relay's flags.

Linux only (`select.epoll`); `available()` says whether this platform has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
from typing import Protocol

logger = logging.getLogger(__name__)

EPOLLIN: int = getattr(select, "EPOLLIN", 1)
EPOLLOUT: int = getattr(select, "EPOLLOUT", 4)
EPOLLERR: int = getattr(select, "EPOLLERR", 8)
EPOLLHUP: int = getattr(select, "EPOLLHUP", 16)
EPOLLRDHUP: int = getattr(select, "EPOLLRDHUP", 0x2000)
EPOLLET: int = getattr(select, "EPOLLET", 1 << 31)

MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
READABLE = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
WRITABLE = EPOLLOUT | EPOLLHUP | EPOLLERR
HANGUP = EPOLLRDHUP | EPOLLHUP | EPOLLERR


def available() -> bool:
    """True when this platform has epoll."""
    return hasattr(select, "epoll")


class Target(Protocol):
    def on_event(self, fd: int, events: int) -> None: ...

    def abort(self, reason: str) -> None: ...


class Poller:
    """An epoll set whose readiness is dispatched to `Target`s, driven by `loop`."""

    __slots__ = ("_ep", "_loop", "targets")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ep: select.epoll | None = select.epoll()
        self.targets: dict[int, Target] = {}
        loop.add_reader(self._ep.fileno(), self._dispatch)

    def add(self, fd: int, target: Target) -> None:
        """Watch `fd` for `target` (edge-triggered, both ways) until `fd` is closed."""
        assert self._ep is not None
        self._ep.register(fd, MASK)
        self.targets[fd] = target

    def forget(self, fd: int) -> None:
        """Stop dispatching `fd` (call right before closing it)."""
        self.targets.pop(fd, None)

    def _dispatch(self) -> None:
        ep = self._ep
        if ep is None:
            return
        targets = self.targets
        for fd, events in ep.poll(0):
            target = targets.get(fd)
            if target is None:
                continue
            try:
                target.on_event(fd, events)
            except Exception:
                logger.exception("relay callback failed")
                with contextlib.suppress(Exception):
                    target.abort("internal_error")

    def close(self) -> None:
        if self._ep is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._ep.fileno())
        self._ep.close()
        self._ep = None
        self.targets.clear()
