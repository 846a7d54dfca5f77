"""A `streams.wakeup.Waker` a data-plane test drives by hand (`ManualWaker`), and the shared
state that hands it to a route (`sleeping`). The process's waker (`sources.sleeper`) starts
containers through Docker; it is proven end to end in tests/e2e/test_wake.py.
"""

from __future__ import annotations

from collections.abc import Callable

from labelproxy.spec import EdgePolicy, Sleep
from labelproxy.streams.shared import SharedState


class ManualWaker:
    """A `wakeup.Waker` the test wakes by hand."""

    def __init__(self) -> None:
        self.up = False
        self.requests = 0
        self.holding = 0
        self.listeners: list[Callable[[str], None]] = []

    def awake(self, container_id: str) -> bool:
        return self.up

    def failed(self, container_id: str) -> str:
        return ""

    def request(self, sleep: Sleep, *, route: str, listen: str) -> None:
        self.requests += 1

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def held(self, route: str, listen: str, delta: int) -> None:
        self.holding += delta

    def wake(self) -> None:
        self.up = True
        for listener in list(self.listeners):
            listener("c1")


def sleeping(waker: ManualWaker) -> SharedState:
    """Shared state (own caps and listeners) whose routes ask `waker`."""
    shared = SharedState.from_edge(EdgePolicy())
    shared.waker = waker
    return shared
