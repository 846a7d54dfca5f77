"""Free port numbers for tests: the one scheme every test uses to pick a port it binds later.

A port a test picks now and labelproxy (or a server) binds later must stay free in between.
The kernel's pick (bind to port 0) is in the ephemeral range (`ip_local_port_range`), where
any outgoing connection of any process (the other pytest-xdist worker's labelproxy, dockerd,
a load loop) may take it as its source port meanwhile: EADDRINUSE, or a test talking to the
wrong socket. So ports here come from below that range (`FIRST` up to its low end, less
`ip_local_reserved_ports`), where no outgoing connection takes one.

Processes share that pool in blocks of `BLOCK` ports: a process claims a block by an
exclusive flock on the block's file under the temp directory, held until the process exits
(the kernel drops it however the process ends), and hands the block's ports out in order,
each once. So the two xdist workers, two runs at once, or bench/ (through tests.support.lp)
never hand out the same port while they run (a later process may claim the block again, and
its bind check skips what the earlier one left bound). Blocks are claimed from the bottom of
the pool, which keeps its top in one piece for long runs (`consecutive_free_ports`).

Each port is bound before it is handed out (for each kind, on the host asked for), so a port
something already uses is skipped. A single port is bound without SO_REUSEADDR, as the
kernel's pick was: a TCP port with connections left in TIME_WAIT is skipped too, so any
server may bind it. A run is bound as labelproxy binds its listeners (SO_REUSEADDR on TCP:
TIME_WAIT leftovers do not count), as the old run helpers did. UDP is never bound
with SO_REUSEADDR (on UDP it would share the port with a holder that set it too).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

logger = logging.getLogger(__name__)

FIRST = 20_000  # the bottom of the pool: well above the ports services usually take
BLOCK = 64  # ports per claim
LOCK_DIR = Path(tempfile.gettempdir()) / "labelproxy-test-ports"
TCP_AND_UDP: tuple[socket.SocketKind, ...] = (socket.SOCK_STREAM, socket.SOCK_DGRAM)
TRIES = 200  # candidate ports (or runs) a request may find taken before it gives up

Kind = int | Sequence[int]


def ephemeral_range() -> tuple[int, int]:
    """The host's ephemeral port range (the kernel's and every outgoing connection's)."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def reserved_ports() -> frozenset[int]:
    """The ports the host keeps back (`ip_local_reserved_ports`: "8080,9000-9100")."""
    text = Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text().strip()
    ports: set[int] = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return frozenset(ports)


def free_port(kind: Kind = socket.SOCK_STREAM, *, host: str = "127.0.0.1") -> int:
    """A port free for `kind` (SOCK_STREAM, SOCK_DGRAM, or `TCP_AND_UDP`) on `host` ("::"
    checks IPv6 and IPv4 at once), below the ephemeral range, that no other caller in this or
    another process gets."""
    return _POOL.take(1, _kinds(kind), host, reuse_addr=False)


def consecutive_free_ports(
    count: int, *, kind: Kind = socket.SOCK_STREAM, host: str = "127.0.0.1"
) -> int:
    """The first of `count` consecutive ports free for `kind` on `host` (a port range), from
    the same pool as `free_port`."""
    return _POOL.take(count, _kinds(kind), host, reuse_addr=True)


def _kinds(kind: Kind) -> tuple[int, ...]:
    return (kind,) if isinstance(kind, int) else tuple(kind)


def bindable(port: int, kinds: Sequence[int], host: str, *, reuse_addr: bool) -> bool:
    """True when `port` can be bound now for each of `kinds` on `host` (then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in kinds:
        with socket.socket(family, kind) as sock:
            if reuse_addr and kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


class _Pool:
    """This process's claimed blocks and the next port to hand out from them."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._pid = os.getpid()
        self._locks: list[int] = []  # fds of the flocked block files, kept open for good
        self._next = 0  # the next port to hand out...
        self._end = 0  # ...of the claimed stretch [_next, _end)

    def take(self, count: int, kinds: Sequence[int], host: str, *, reuse_addr: bool) -> int:
        if count < 1:
            raise ValueError(f"a run of {count} ports")
        with self._mutex:
            if self._pid != os.getpid():  # a forked child: the parent's blocks are not its own
                self._pid, self._locks, self._next, self._end = os.getpid(), [], 0, 0
            reserved, tried = reserved_ports(), []
            for _ in range(TRIES):
                if self._next + count > self._end:
                    self._next, self._end = self._claim(count)
                first = self._next
                tried.append(first)
                taken = next(
                    (p for p in range(first, first + count)
                     if p in reserved or not bindable(p, kinds, host, reuse_addr=reuse_addr)),
                    None,
                )  # fmt: skip
                self._next = first + count if taken is None else taken + 1
                if taken is None:
                    return first
        what = "a port" if count == 1 else f"{count} consecutive ports"
        raise AssertionError(
            f"no {what} free on {host}: {TRIES} tried, from {tried[0]} to {tried[-1]}"
        )

    def _claim(self, count: int) -> tuple[int, int]:
        """Claim the lowest run of free blocks that holds `count` ports: (first, end)."""
        low, _ = ephemeral_range()
        blocks = (low - FIRST) // BLOCK
        need = -(-count // BLOCK)
        LOCK_DIR.mkdir(exist_ok=True)
        for start in range(blocks - need + 1):
            fds: list[int] = []
            for index in range(start, start + need):
                fd = os.open(LOCK_DIR / f"{FIRST + index * BLOCK}", os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process's (or already ours)
                    os.close(fd)
                    break
                fds.append(fd)
            if len(fds) == need:
                self._locks.extend(fds)
                first = FIRST + start * BLOCK
                logger.debug("claimed test ports %d-%d", first, first + need * BLOCK - 1)
                return first, first + need * BLOCK
            for fd in fds:
                with suppress(OSError):
                    os.close(fd)  # closing the only descriptor drops its flock
        raise AssertionError(
            f"no {need} free blocks of {BLOCK} test ports in {FIRST}-{low - 1}: other "
            f"processes hold them (flocks on {LOCK_DIR}/*)"
        )


_POOL = _Pool()
