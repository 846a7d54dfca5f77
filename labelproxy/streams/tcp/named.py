"""The `TcpServer` of a route chosen by name: its clients come from a shared listener.

A route with `hostnames` does not accept: its shared listener (`names.NameGroup`) reads a
client's first bytes, picks the route by the name in them and hands the client over with
`NamedServer.hand`: its addresses (after any PROXY header), the bytes read (relayed first,
unchanged) and the name (for the access log). From there it is any client of the route:
admitted (the route's ACL and caps), held for a ready backend, dialled and relayed by the
`TcpServer` it inherits. Backends given as host names are resolved in a short task on the
asyncio loop first, as `setup` does for a route's own listener.
"""

from __future__ import annotations

import logging
import os

from labelproxy.spec import Backend
from labelproxy.streams.tcp.dial import Address
from labelproxy.streams.tcp.server import TcpServer
from labelproxy.streams.tcp.setup import Found, resolve_all

logger = logging.getLogger(__name__)

# a client a shared listener handed over: fd, source, peer, dest, bytes read, name read
_HandJob = tuple[int, tuple[str, int], tuple[str, int], tuple[str, int], bytes, str]


class NamedServer(TcpServer):
    """A route's server fed by its shared listener (`hand`) instead of an acceptor."""

    def hand(
        self,
        client: int,
        source: tuple[str, int],
        peer: tuple[str, int],
        dest: tuple[str, int],
        *,
        rest: bytes,
        name: str,
    ) -> None:
        """(data loop) A client a shared listener read `name` from and chose this route for
        (its PROXY header, if any, already read): `rest` is what it read, relayed first."""
        spec = self.live.spec
        if spec is not self._spec_seen:
            self._adopt(spec)
        addrs = self._addrs
        if addrs is None:  # names to resolve: a task, then back here
            self.setups += 1
            job = (client, source, peer, dest, rest, name)
            self._aloop.call_soon_threadsafe(self._start_resolve, job)
            return
        self.open(client, source, peer, dest, rest=rest, sniff=False, addrs=addrs, name=name)

    def _start_resolve(self, job: _HandJob) -> None:
        """(asyncio) Resolve the backends' names for a handed client, then open it."""
        if self._tg is None:  # the listener is stopping
            os.close(job[0])
            self.loop.submit(self._set_up_done, -1, job[2], None, False, False)
            return
        self._setup_tasks += 1
        self._tg.start_soon(self._resolve, job)

    async def _resolve(self, job: _HandJob) -> None:
        client, source, peer, dest, rest, name = job
        addrs: dict[Backend, Address | None] | None = None
        try:
            addrs = await resolve_all(self.live)
        except Exception:
            logger.exception("route %s: connection setup failed", self.live.spec.alias)
        finally:
            self._setup_tasks -= 1
            found = None if addrs is None else Found(source, dest, rest, addrs)
            if found is None:
                os.close(client)
                client = -1
            self.loop.submit(self._resolved, client, peer, found, name)

    def _resolved(
        self, client: int, peer: tuple[str, int], found: Found | None, name: str
    ) -> None:
        """(data loop) A handed client's backends were resolved (`found`; None: failed)."""
        self.setups -= 1
        if found is not None:
            self.open(client, found.source, peer, found.dest, rest=found.rest, sniff=False,
                      addrs=found.addrs, name=name)  # fmt: skip
        self._settled()
