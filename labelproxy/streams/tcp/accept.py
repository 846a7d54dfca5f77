"""The accept loop of a TCP listener, as a data-loop target (no task).

`Acceptor` watches the listening socket on the TCP data loop (level-triggered), accepts up
to a batch of clients per wake-up as raw non-inheritable fds (no socket object per client),
makes each non-blocking, names its addresses and hands it to `on_client(fd, peer, listen)`:
the client's and the listener's (host, port), IPv4-mapped ones unwrapped; the listener
tuple is shared between clients that reach the same address (idle connections stay small),
and each new local address is reported to `learn_local` (a dial to it may loop). On one of
`sockets.RESOURCE_ERRNOS` it stops watching, logs once and retries after the accept
back-off, never dying on them; any other accept error is skipped. `close()` stops it and
closes the listening socket. Everything here runs on the data loop.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable
from fcntl import ioctl
from functools import partial
from termios import FIONBIO

from labelproxy.streams.addresses import unmapped
from labelproxy.streams.sockets import RESOURCE_ERRNOS, accept_backoff, bound_address
from labelproxy.streams.tcp.loop import EPOLLIN, DataLoop, Timer

logger = logging.getLogger(__name__)

BATCH = 64
_ON = struct.pack("i", 1)
_UNSPECIFIED = frozenset({"0.0.0.0", "::"})

Address = tuple[str, int]


def local_address(fd: int, family: socket.AddressFamily) -> Address:
    """(host, port) a raw socket fd is bound to (a throwaway socket object, fd kept)."""
    carrier = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    try:
        return bound_address(carrier)
    finally:
        carrier.detach()


def accept_fd(sock: socket.socket) -> tuple[int, Address]:
    """`accept` returning a raw fd (for a socket without CPython's `_accept`)."""
    client, peer = sock.accept()
    return client.detach(), peer


class Acceptor:
    """(data loop) Accepts from `sock` and calls `on_client`; `name` labels its log lines."""

    __slots__ = (
        "_accept",
        "_backoff",
        "_family",
        "_fixed_listen",
        "_last_listen",
        "_timer",
        "_watching",
        "learn_local",
        "loop",
        "name",
        "on_client",
        "sock",
    )

    def __init__(
        self,
        loop: DataLoop,
        sock: socket.socket,
        on_client: Callable[[int, Address, Address], None],
        *,
        name: str,
        learn_local: Callable[[str], None],
    ) -> None:
        self.loop = loop
        self.sock: socket.socket | None = sock
        self.on_client: Callable[[int, Address, Address], None] | None = on_client
        self.learn_local = learn_local
        self.name = name
        self._accept: Callable[[], tuple[int, Address]] = getattr(
            sock, "_accept", None
        ) or partial(accept_fd, sock)
        self._backoff = 0.0
        self._timer: Timer | None = None
        self._watching = False
        bound = bound_address(sock)
        self._family = sock.family
        fixed = sock.family == socket.AF_INET and bound[0] not in _UNSPECIFIED
        self._fixed_listen = bound if fixed else None  # every client reaches this one
        self._last_listen: Address = ("", 0)

    def start(self) -> None:
        if self.sock is not None and not self._watching:
            self.loop.add(self.sock.fileno(), self, EPOLLIN)
            self._watching = True

    def close(self) -> None:
        """Stop accepting and close the listening socket; the callbacks are dropped, so a
        stopped listener is freed by reference counting alone (no cycle through it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sock is not None:
            self._unwatch()
            self.sock.close()
            self.sock = None
        self.on_client = None

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
            on_client = self.on_client
            if self.sock is None or on_client is None:
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
                ioctl(client, FIONBIO, _ON)  # O_NONBLOCK in one system call
                listen = self._fixed_listen
                if listen is not None:
                    on_client(client, peer_addr, listen)
                else:
                    on_client(client, *self._addresses(client, peer_addr))
            except Exception:
                logger.exception("%s: connection setup failed", self.name)
                os.close(client)

    def _addresses(self, client: int, peer_addr: Address) -> tuple[Address, Address]:
        """(client, listener) addresses of a client of a wildcard or IPv6 listener."""
        if self._family == socket.AF_INET6:
            peer = (unmapped(peer_addr[0]), int(peer_addr[1]))
            name = local_address(client, self._family)
            listen = (unmapped(name[0]), name[1])
        else:
            peer = (peer_addr[0], peer_addr[1])
            listen = local_address(client, self._family)
        if listen == self._last_listen:
            listen = self._last_listen
        else:
            self._last_listen = listen
            self.learn_local(listen[0])
        return peer, listen

    def _back_off(self, exc: OSError) -> None:
        if not self._backoff:
            logger.error("%s: accept failed: %s; backing off", self.name, exc)
        self._backoff = accept_backoff(self._backoff)
        self._unwatch()
        self._timer = self.loop.call_later(self._backoff, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if self.sock is not None:
            self.start()
            self._on_readable()
