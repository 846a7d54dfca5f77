"""The access log: one record per closed TCP connection or UDP session, and the open lines.

`log_closed` writes one INFO record on the `labelproxy.access` logger when a connection or
session ends, with the same fields for both transports (client, route, listen key, backend,
bytes each way, duration, close reason; and the name the client asked for, on a route
chosen by name) as structured context (`extra`), so the text and
JSON log formats render them alike; it costs nothing but a level check when that logger is
off. `log_opened` is the DEBUG line of a new connection or session, on `logger` (a caller on
a hot path asks `logger.isEnabledFor(DEBUG)` first). Callers pass the listen key's text,
made once per listener. Both run on the thread that owns the connection (TCP: the data
loop; UDP: the asyncio loop).
"""

from __future__ import annotations

import logging
import time

from labelproxy.streams.hooks import ConnInfo

logger = logging.getLogger(__name__)
access_log = logging.getLogger("labelproxy.access")


def log_opened(conn: ConnInfo, *, listen: str) -> None:
    """DEBUG: a connection or session was admitted and is going to `conn.backend`."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    logger.debug(
        "%s %s: %s:%d -> %s open",
        conn.transport,
        conn.route,
        conn.client[0],
        conn.client[1],
        conn.backend,
        extra={
            "route": conn.route,
            "protocol": conn.transport,
            "listen": listen,
            "dst": str(conn.backend),
            "action": "open",
        },
    )


def log_closed(conn: ConnInfo, *, listen: str) -> None:
    """INFO on `labelproxy.access`: `conn` ended (`conn.close_reason`, "closed" if none)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    backend = str(conn.backend) if conn.backend is not None else ""
    access_log.info(
        "%s %s closed",
        conn.transport,
        "connection" if conn.transport == "tcp" else "session",
        extra={
            "client": f"{conn.client[0]}:{conn.client[1]}",
            "route": conn.route,
            "protocol": conn.transport,
            "listen": listen,
            "backend": backend,
            "dst": backend,
            "action": "close",
            "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out,
            "duration": round(time.monotonic() - conn.started, 6),
            "reason": conn.close_reason or "closed",
            "server_name": conn.name,
        },
    )
