"""The accept loop of a TCP listener, as a data-loop target (no task).

`Acceptor` watches the listening socket on the TCP data loop (level-triggered), accepts up
to a batch of clients per wake-up as raw non-inheritable fds (no socket object per client)
and hands each to `on_client(fd, address)`. On EMFILE/ENFILE/ENOBUFS/ENOMEM it stops
watching, logs once and retries after an exponential backoff (10 ms up to 1 s), never
dying on them; any other accept error is skipped. `close()` stops it and closes the
listening socket.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from functools import partial

from labelproxy.streams.sockets import accept_fd
from labelproxy.streams.tcp.loop import EPOLLIN, DataLoop, Timer

logger = logging.getLogger("labelproxy.streams.tcp.server")

RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BATCH = 64
BACKOFF_MIN, BACKOFF_MAX = 0.01, 1.0


class Acceptor:
    """Accepts from `sock` and calls `on_client`; `name` labels its log lines. Every
    method runs on the data loop's thread."""

    def __init__(
        self,
        loop: DataLoop,
        sock: socket.socket,
        on_client: Callable[[int, tuple[str, int]], None],
        *,
        name: str,
    ) -> None:
        self.loop = loop
        self.sock: socket.socket | None = sock
        self.on_client = on_client
        self.name = name
        self._accept: Callable[[], tuple[int, tuple[str, int]]] = getattr(
            sock, "_accept", None
        ) or partial(accept_fd, sock)
        self._backoff = 0.0
        self._timer: Timer | None = None
        self._watching = False

    def start(self) -> None:
        if self.sock is not None and not self._watching:
            self.loop.add(self.sock.fileno(), self, EPOLLIN)
            self._watching = True

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sock is not None:
            self._unwatch()
            self.sock.close()
            self.sock = None

    def _unwatch(self) -> None:
        if self._watching and self.sock is not None:
            self.loop.remove(self.sock.fileno())
            self._watching = False

    def on_event(self, fd: int, events: int) -> None:
        self._on_readable()

    def abort(self, reason: str) -> None:
        """A failed callback: the listener goes on accepting (nothing to abort)."""

    def _on_readable(self) -> None:
        for _ in range(BATCH):
            if self.sock is None:
                return
            try:
                client, peer_addr = self._accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._back_off(exc)
                    return
                logger.debug("%s: accept: %s", self.name, exc)
                continue
            self._backoff = 0.0
            try:
                self.on_client(client, peer_addr)
            except Exception:
                logger.exception("%s: connection setup failed", self.name)
                os.close(client)

    def _back_off(self, exc: OSError) -> None:
        if not self._backoff:
            logger.error("%s: accept failed: %s; backing off", self.name, exc)
        self._backoff = min(max(self._backoff * 2, BACKOFF_MIN), BACKOFF_MAX)
        self._unwatch()
        self._timer = self.loop.call_later(self._backoff, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if self.sock is not None:
            self.start()
            self._on_readable()
