"""Socket helpers shared by the listeners: binding by address family, accept back-off.

A route's `Family` decides what its listen key binds to:
  "ipv4"  AF_INET on the bind address;
  "ipv6"  AF_INET6 with IPV6_V6ONLY=1;
  "dual"  AF_INET6 with IPV6_V6ONLY=0 on an IPv6 bind (`::` takes IPv4 clients as mapped
          addresses), falling back to AF_INET 0.0.0.0 when the host has no IPv6; a dual
          route with an explicit IPv4 bind just binds that address.
Every socket is non-blocking; TCP ones get SO_REUSEADDR, UDP ones do not (on Linux it
would let two UDP listeners share one port). A bind failure raises
OSError, the socket closed, so the caller can report the route in error before it says
"started".

An accept loop that fails with one of `RESOURCE_ERRNOS` (out of descriptors, buffers or
memory) stops accepting for `accept_backoff(previous)` seconds (10 ms, doubling up to 1 s)
instead of dying or spinning: the TCP listeners (`tcp.accept`) and the HTTP endpoints
(`labelproxy.http`) back off alike.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable

from labelproxy.spec import Family, ListenKey

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_MIN, BACKOFF_MAX = 0.01, 1.0


def accept_backoff(previous: float) -> float:
    """How long to stop accepting after a resource error (`previous`: the last pause, 0 for
    none since the last accept that worked)."""
    return min(max(previous * 2, BACKOFF_MIN), BACKOFF_MAX)


def has_ipv6() -> bool:
    """True when the host can open an IPv6 socket."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
            return True
    except OSError:
        return False


def listen_family(bind: str, family: Family) -> tuple[socket.AddressFamily, str, bool | None]:
    """Which socket family, address and IPV6_V6ONLY value (None: leave it) a bind uses."""
    ip = ipaddress.ip_address(bind.split("%", 1)[0])
    if ip.version == 4:
        if family == "ipv6":
            raise OSError(f"bind address {bind} is IPv4 but the scheme is IPv6-only")
        return socket.AF_INET, bind, None
    if family == "ipv4":
        raise OSError(f"bind address {bind} is IPv6 but the scheme is IPv4-only")
    if family == "dual":
        if not has_ipv6():
            if ip.is_unspecified:
                return socket.AF_INET, "0.0.0.0", None
            raise OSError(f"bind address {bind} is IPv6 but the host has no IPv6")
        return socket.AF_INET6, bind, False
    return socket.AF_INET6, bind, True


def bind_socket(
    key: ListenKey,
    family: Family,
    *,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    backlog: int = LISTEN_BACKLOG,
    prepare: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """Open, bind and (for TCP) listen on `key`; non-blocking. `prepare` sets options
    before the bind. Raises OSError on failure."""
    af, host, v6only = listen_family(key.bind, family)
    sock = socket.socket(af, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if prepare is not None:
            prepare(sock)
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        sock.setblocking(False)
        sock.bind((host, key.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def bound_address(sock: socket.socket) -> tuple[str, int]:
    """(host, port) a socket is bound to, whatever its family."""
    name = sock.getsockname()
    return str(name[0]), int(name[1])


def set_nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY: small writes go out at once (the relay never coalesces on purpose)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        logger.debug("TCP_NODELAY unavailable on %s", sock)
