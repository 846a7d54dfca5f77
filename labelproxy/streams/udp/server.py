"""The UDP listener of a route: `serve_udp` binds, relays and stops on the route's signal.

Behaviour a user sees:
- One session per client address (IP and port). The first datagram from a new address runs the
  admission hooks: a client the ACL denies creates no session, and that datagram (and each
  later one) is dropped and counted as `udp_datagrams_dropped_total{reason="acl"}`; with no
  backend it is dropped as `no_backend`. Each session has its own connected upstream socket, so
  the kernel matches replies, which go back to the client from the listening socket. Datagrams
  up to the protocol maximum (65,507 bytes over IPv4) pass whole, never truncated.
- Session cap (`max_connections`, default `LABELPROXY_UDP_MAX_SESSIONS` = 10,000): datagrams
  from NEW client addresses beyond the cap are dropped and counted with reason `limit`;
  existing sessions are never evicted, so a flood of new sources cannot break established
  flows. A new source gets a session once an idle one expires.
- Idle expiry (`idle_timeout`, default `LABELPROXY_UDP_IDLE_TIMEOUT` = 5m): a session is
  closed after that long without a datagram in either direction; the next datagram from that
  address opens a new session (possibly to another backend).
- Backends change (`live.update`): new sessions use the new backends; a session whose backend
  left the route (container stopped, unhealthy, replaced) is ended (reason `backend_gone`)
  when the change is seen, and the client's next datagram opens a session to a current
  backend. Such a session would otherwise stick to a dead backend for as long as its
  client keeps talking.
- Upstream errors (an ICMP "port unreachable" from the backend, a send that fails) count as
  `upstream_error` drops and never end the session or the listener.
- `proxy_protocol: v2` puts a PROXY v2 header (command PROXY, transport DGRAM, the real client
  and listener addresses) in front of every datagram sent upstream; it is built once per
  session. A datagram that no longer fits with the header is dropped as `upstream_error`.
  Accepting PROXY headers FROM clients is TCP-only: a UDP datagram is relayed as it came.
- Counters: `udp_datagrams_total` and `bytes_total` per direction count what was relayed
  (payload bytes, without any PROXY header); `udp_sessions_active` follows admit/release.
  One access-log record (logger `labelproxy.access`, INFO) per ended session; DEBUG per open.
- Stop (`live.close()`): the route drains like a TCP one (`drain.Drain`): datagrams from new
  sources are dropped from then on (`live.stopped_admitting`), while existing sessions keep
  relaying both ways until each is idle for its `idle_timeout` or the drain timeout passes;
  then the rest end with reason `drain_timeout`, the listening socket closes
  (`live.listener_closed`: the port is free again; it stays bound until then because the
  replies leave through it) and `live.finished` is set. `live.close(0)` ends the drain now.
  Outside cancellation closes everything promptly (reason `cancelled`).

Requires the asyncio event loop (uvloop or the standard one) under anyio: the relay runs in
`add_reader` callbacks (see `relay`); on Linux they move what queued behind a wake-up's
first datagram in batches with recvmmsg/sendmmsg (`batched`), elsewhere one system call
per datagram.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc

import labelproxy.streams.udp.batched as batched_path
from labelproxy.spec import ListenKey
from labelproxy.streams.live import LiveRoute
from labelproxy.streams.udp.batched import BatchedUdpRelay
from labelproxy.streams.udp.relay import UdpRelay
from labelproxy.streams.udp.sockets import bind_udp_listener

logger = logging.getLogger(__name__)

__all__ = ["serve_udp"]


async def serve_udp(
    live: LiveRoute, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve `live`'s UDP listener until `live.closing` is set (or cancelled).

    Raises OSError (before `task_status.started()`) when the address cannot be bound.
    """
    spec = live.spec
    sock = bind_udp_listener(spec)
    relay: UdpRelay | None = None
    reason = "cancelled"
    name = sock.getsockname()
    own = ListenKey("udp", spec.key.bind, int(name[1]))
    live.shared.own.add(own, spec.family)
    try:
        live.bound = [(str(name[0]), int(name[1]))]
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:

            def spawn(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
                tg.start_soon(factory)

            relay_type = BatchedUdpRelay if batched_path.ENABLED else UdpRelay
            relay = relay_type(live, sock, loop=loop, spawn=spawn)
            relay.start()
            logger.debug(
                "udp listener up on %s for route %s",
                spec.key,
                spec.alias,
                extra={"route": spec.alias, "protocol": "udp", "listen": str(spec.key)},
            )
            task_status.started()
            await live.closing.wait()
            left = relay.stop_admitting()
            live.stopped_admitting.set()
            await relay.drain.wait(live, left, what="sessions")
            reason = "drain_timeout"
            if relay.resolving:  # only then: a drain that ends cancels nothing
                tg.cancel_scope.cancel()
    finally:
        live.shared.own.remove(own, spec.family)
        live.stopped_admitting.set()
        if relay is not None:
            relay.stop_listening()
        else:
            sock.close()
        live.listener_closed.set()
        if relay is not None:
            relay.close_all(reason)
        live.finished.set()
        logger.debug(
            "udp listener down on %s for route %s",
            spec.key,
            spec.alias,
            extra={"route": spec.alias, "protocol": "udp", "listen": str(spec.key)},
        )
