"""The SNI-routed listeners of the `sni` section (`bench/sni.py`), as the targets configure
them: HAProxy's frontend and labelproxy's routes, two names on one port, both to the echo
upstream. Imports nothing of the bench (the targets and the measurements both use it)."""

from __future__ import annotations

ROUTE = "sni"
NAMES = ("a.bench.test", "b.bench.test")
ASKED = NAMES[1]  # the name every bench client asks for


def haproxy_frontend(port: int, echo: int) -> str:
    """HAProxy's SNI-routed frontend for the `sni` route."""
    return (
        f"frontend f_{ROUTE}\n    bind 127.0.0.1:{port}\n"
        "    tcp-request inspect-delay 5s\n"
        "    tcp-request content accept if { req_ssl_hello_type 1 }\n"
        + "".join(f"    use_backend b_{ROUTE}_{i} if {{ req_ssl_sni -i {name} }}\n"
                  for i, name in enumerate(NAMES))
        + "".join(f"backend b_{ROUTE}_{i}\n    server s1 127.0.0.1:{echo}\n"
                  for i in range(len(NAMES)))
    )  # fmt: skip


def labelproxy_routes(port: int, echo: int) -> list[str]:
    """The routes-file lines of labelproxy's `sni` routes (one per name, one port)."""
    return [
        f"  bench-{ROUTE}-{i}: {{scheme: tcp4, bind: 127.0.0.1, port: \"{port}:{echo}\", "
        f"host: 127.0.0.1, healthcheck: none, hostnames: \"{name}\"}}"
        for i, name in enumerate(NAMES)
    ]
