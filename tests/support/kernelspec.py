"""Route specs for kernel tests, from plain dicts that cross the test/agent process boundary.

`route_spec({"alias": "web", "scheme": "tcp4", "port": 8000, "backends": [["127.0.0.1", 9000]],
"options": {"deny": ["192.0.2.2/32"], "max_connections": 2}})` -> a `RouteSpec`, built the way
the labels would build it (default bind of the scheme, sorted backends).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from labelproxy.spec import (
    Backend,
    ListenKey,
    RouteOptions,
    RouteSpec,
    default_bind,
    transport_of,
)


def route_spec(route: dict[str, Any]) -> RouteSpec:
    """The `RouteSpec` a test describes (see the module docstring)."""
    scheme = route.get("scheme", "tcp")
    bind = route.get("bind") or default_bind(scheme)
    options = dict(route.get("options", {}))
    for name in ("allow", "deny"):
        options[name] = tuple(ipaddress.ip_network(net) for net in options.get(name, ()))
    return RouteSpec(
        alias=route.get("alias", "route"),
        scheme=scheme,
        key=ListenKey(transport_of(scheme), bind, int(route["port"])),
        backends=tuple(sorted(Backend(host, int(port)) for host, port in route["backends"])),
        options=RouteOptions(**options),
    )
