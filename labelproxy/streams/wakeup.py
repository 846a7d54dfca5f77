"""What the data plane asks of wake on demand, and nothing of how it is done (`Waker`).

A route whose options carry a `spec.Sleep` belongs to a container that may be asleep. Its
listeners ask the process's `Waker` (`shared.SharedState.waker`; the one implementation is
`sources.sleeper.Sleeper`, which the relay never imports) three things:

- `awake(container_id)`: may a new client go on to its backends (the container was not put
  to sleep, is not being stopped, and its wake, if any, is over)? Lock-free, any thread.
- `request(sleep, route=, listen=)`: an admitted client wants the container: start it once
  (single flight), or after the stop in progress. Any thread; returns at once.
- `subscribe(listener)`: `listener(container_id)` is called (on the waker's thread) when a
  container's state changed (awake, or its wake failed), so held clients look again.

`held(route, listen, delta)` keeps the gauge of clients held during a wake.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from labelproxy.spec import Sleep

logger = logging.getLogger(__name__)

WakeListener = Callable[[str], None]


class Waker(Protocol):
    """See the module doc."""

    def awake(self, container_id: str) -> bool: ...

    def failed(self, container_id: str) -> str:
        """Why the last wake of `container_id` failed ("" when it did not)."""
        ...

    def request(self, sleep: Sleep, *, route: str, listen: str) -> None: ...

    def subscribe(self, listener: WakeListener) -> Callable[[], None]: ...

    def held(self, route: str, listen: str, delta: int) -> None: ...
