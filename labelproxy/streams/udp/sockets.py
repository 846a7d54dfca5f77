"""Socket plumbing for the UDP data plane: the listener bind and the upstream sockets.

Everything here is synchronous and small: `bind_udp_listener` opens a route's listening
socket by its scheme's family (`sockets.bind_socket`: IPv4; IPv6 only; dual-stack `::`
with a fallback to IPv4 on hosts without IPv6), `open_upstream` makes a session's
connected, non-blocking upstream socket, and `local_address_towards` names the listener
address a client sent to (the destination of the PROXY v2 header, which
`proxyproto.build_dgram_header` builds).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys

from labelproxy.spec import RouteSpec
from labelproxy.streams.addresses import literal_family, unmapped
from labelproxy.streams.sockets import bind_socket

logger = logging.getLogger(__name__)

#: Largest UDP payload over IPv6 without jumbograms; also covers IPv4's 65,507.
MAX_DATAGRAM = 65_535
LISTENER_BUFFER_BYTES = 4 * 1024 * 1024
UPSTREAM_BUFFER_BYTES = 1024 * 1024

SockAddr = tuple[str, int] | tuple[str, int, int, int]

# Linux's SO_*BUFFORCE (CAP_NET_ADMIN may exceed net.core.[rw]mem_max); Python lacks the names.
_LINUX = sys.platform.startswith("linux")
_SO_SNDBUFFORCE: int | None = getattr(socket, "SO_SNDBUFFORCE", 32 if _LINUX else None)
_SO_RCVBUFFORCE: int | None = getattr(socket, "SO_RCVBUFFORCE", 33 if _LINUX else None)


def _set_buffers(sock: socket.socket, *, size: int) -> None:
    """Ask for `size`-byte kernel buffers; as root go past net.core.[rw]mem_max."""
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            if force is None:
                raise PermissionError
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
            except OSError:
                logger.debug("could not set socket buffer %d to %d bytes", plain, size)


def bind_udp_listener(spec: RouteSpec) -> socket.socket:
    """Open and bind the non-blocking UDP socket of `spec` by its scheme's family
    (`sockets.bind_socket`), with large kernel buffers; raises OSError on failure."""
    return bind_socket(
        spec.key,
        spec.family,
        kind=socket.SOCK_DGRAM,
        prepare=lambda sock: _set_buffers(sock, size=LISTENER_BUFFER_BYTES),
    )


def open_upstream(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket connected to `host` (an IP literal) and `port`.

    Connected, so the kernel delivers only that backend's replies to it and reports ICMP
    errors (port unreachable) as ConnectionRefusedError on the next send or receive.
    """
    family = literal_family(host)
    if family is None:
        raise OSError(f"not an IP address: {host}")
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        _set_buffers(sock, size=UPSTREAM_BUFFER_BYTES)
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def local_address_towards(client: tuple[str, int], bound: tuple[str, int]) -> tuple[str, int]:
    """The listener address a client most likely sent to, in the client's address family.

    A specific bind address is the answer; for a wildcard bind the kernel's source address
    towards the client (a connected probe socket, no packet sent) is.
    """
    client_ip = ipaddress.ip_address(client[0].split("%", 1)[0])
    bound_ip = ipaddress.ip_address(unmapped(bound[0]).split("%", 1)[0])
    if not bound_ip.is_unspecified and bound_ip.version == client_ip.version:
        return str(bound_ip), bound[1]
    family = socket.AF_INET if client_ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(client_ip), client[1] or 9))
            local = str(probe.getsockname()[0])
    except OSError:
        local = "0.0.0.0" if client_ip.version == 4 else "::"
    return local, bound[1]
