"""Client, listener and backend addresses: the one place that parses and unwraps them.

- `ip_of(host)`: an address for matching (ACLs, PROXY headers, own-listener checks): the
  zone id dropped and an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack
  listener reports for an IPv4 client) unwrapped to IPv4; None for a host name. It is
  `spec.ip_of`, which binds are matched with too.
- `unmapped(host)`: the same unwrapping as text, for the addresses a socket reports per
  connection or session (a string test, no parsing: it runs once per client).
- `literal_family(host)`: the socket family to dial or send to an IP literal at (not
  unwrapped: a mapped address is dialled over IPv6); None for a host name.
"""

from __future__ import annotations

import ipaddress
import socket

from labelproxy.spec import IPAddress, ip_of

__all__ = ["IPAddress", "ip_of", "literal_family", "unmapped"]

_MAPPED = "::ffff:"


def unmapped(host: str) -> str:
    """`::ffff:10.0.0.1` -> `10.0.0.1`; any other address unchanged (a socket's own text,
    lower case, so a prefix test is enough)."""
    if host.startswith(_MAPPED) and "." in host:
        return host[len(_MAPPED) :]
    return host


def literal_family(host: str) -> socket.AddressFamily | None:
    """AF_INET or AF_INET6 for an IP literal (a zone id allowed); None for a host name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6
