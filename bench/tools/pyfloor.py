"""pyfloor: the least work a correct single-threaded CPython TCP relay does.

A measuring stick for the benchmark, not a product: it answers "how fast can any CPython
relay be on this machine?", so labelproxy's figures can be read against a floor made of
nothing but the interpreter and the system calls every relay needs. It has no metrics, no
ACL, no splice, no timeouts, no logging and no UDP.

    python pyfloor.py LISTEN_PORT:UPSTREAM_PORT [LISTEN_PORT:UPSTREAM_PORT ...]

Every pair listens on 127.0.0.1:LISTEN_PORT and relays each accepted connection to
127.0.0.1:UPSTREAM_PORT, all in one edge-triggered `select.epoll` loop: accept until EAGAIN,
non-blocking connect, copy with `os.readv` into one shared 64 KiB buffer and `os.write`; a
remainder the destination does not take is kept and written when it becomes writable. A read
shorter than the buffer drained the socket (the next arrival is a new edge), so no read is
spent on EAGAIN, except after a hang-up, which is read until EOF. An EOF
is passed on as `shutdown(SHUT_WR)` once everything read was written (half-close); both
sockets close when both directions ended (the last EOF needs no shutdown: the close sends the
FIN), or on any error. SIGTERM or SIGINT ends it with
status 0.

Sockets are the C type `_socket.socket` and connections are accepted with its `_accept`
(the layer under `socket.socket`, which would add Python calls and enum conversions per
connection): a floor must not carry work a lean relay avoids.
"""

from __future__ import annotations

import _socket
import os
import select
import signal
import socket
import sys
from types import FrameType

HOST = "127.0.0.1"
BUFFER_SIZE = 64 * 1024
BACKLOG = 4096
EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class Flow:
    """One direction of a connection: what `src` sends goes to `dst`."""

    __slots__ = ("done", "dst", "dst_fd", "eof", "hup", "pending", "src_fd")

    def __init__(self, src: _socket.socket, dst: _socket.socket) -> None:
        self.src_fd = src.fileno()
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.pending = b""  # read but not yet written
        self.hup = False  # src hung up: read it until EOF
        self.eof = False  # src reached EOF
        self.done = False  # EOF passed on to dst


class Conn:
    """A client socket, its upstream socket and the two flows between them."""

    __slots__ = ("client", "flows", "upstream")

    def __init__(self, client: _socket.socket, upstream: _socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.flows = (Flow(client, upstream), Flow(upstream, client))

    def close(self) -> None:
        self.client.close()  # closing an fd also takes it out of the epoll set
        self.upstream.close()


def pump(flow: Flow, reverse: Flow, buf: bytearray, view: memoryview) -> None:
    """Move bytes along `flow` until the source is drained or the destination would block,
    or the EOF has been passed on (`reverse` is the other way of the same connection). A
    failure other than EAGAIN raises OSError."""
    try:
        while not flow.done:
            if flow.pending:
                sent = os.write(flow.dst_fd, flow.pending)
                flow.pending = flow.pending[sent:]
                if flow.pending:
                    return
            if flow.eof:
                if not reverse.done:  # else both ways ended: the close sends the FIN
                    flow.dst.shutdown(socket.SHUT_WR)
                flow.done = True
                return
            size = os.readv(flow.src_fd, [buf])
            if size == 0:
                flow.eof = True
                continue
            try:
                sent = os.write(flow.dst_fd, view[:size])
            except BlockingIOError:
                sent = 0
            if sent < size:
                flow.pending = bytes(view[sent:size])
                return
            if size < BUFFER_SIZE and not flow.hup:
                return
    except BlockingIOError:
        return


def accept_all(
    listener: socket.socket, upstream_port: int, ep: select.epoll, conns: dict[int, Conn]
) -> None:
    """Accept every pending connection on `listener` and start its upstream connect."""
    while True:
        try:
            fd, _addr = listener._accept()  # type: ignore[attr-defined]  # (fd, address)
        except BlockingIOError:
            return
        client = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
        client.setblocking(False)
        upstream = _socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.connect_ex((HOST, upstream_port))  # EINPROGRESS; a failure shows on use
        conn = Conn(client, upstream)
        for sock in (client, upstream):
            conns[sock.fileno()] = conn
            ep.register(sock.fileno(), EVENTS)


def on_event(
    conn: Conn, fd: int, mask: int, conns: dict[int, Conn], buf: bytearray, view: memoryview
) -> None:
    """`fd` of `conn` is readable (pump the flow it feeds) and/or writable (finish what the
    other flow holds for it); close when both flows ended, or on a failure."""
    inbound, outbound = conn.flows
    source, other = (inbound, outbound) if fd == inbound.src_fd else (outbound, inbound)
    try:
        if mask & HANGUP:
            source.hup = True
        if mask & (select.EPOLLIN | HANGUP):
            pump(source, other, buf, view)
        if mask & select.EPOLLOUT and other.pending:
            pump(other, source, buf, view)
        if not (inbound.done and outbound.done):
            return
    except OSError:
        pass
    conns.pop(inbound.src_fd, None)
    conns.pop(outbound.src_fd, None)
    conn.close()


def listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit
    listener.bind((HOST, port))
    listener.listen(BACKLOG)
    listener.setblocking(False)
    return listener


def serve(pairs: list[tuple[int, int]]) -> None:
    """Relay every pair until a signal ends the process."""
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    conns: dict[int, Conn] = {}
    with select.epoll() as ep:
        listeners: dict[int, tuple[socket.socket, int]] = {}
        for listen_port, upstream_port in pairs:
            listener = listen(listen_port)
            listeners[listener.fileno()] = (listener, upstream_port)
            ep.register(listener.fileno(), select.EPOLLIN | select.EPOLLET)
        while True:
            for fd, mask in ep.poll():
                conn = conns.get(fd)
                if conn is not None:
                    on_event(conn, fd, mask, conns, buf, view)
                elif fd in listeners:
                    accept_all(*listeners[fd], ep, conns)


def parse_pairs(args: list[str]) -> list[tuple[int, int]]:
    """`["8000:9000", ...]` -> `[(8000, 9000), ...]`; ValueError on anything else."""
    pairs = []
    for arg in args:
        listen_port, _, upstream_port = arg.partition(":")
        pairs.append((int(listen_port), int(upstream_port)))
    if not pairs:
        raise ValueError("no LISTEN_PORT:UPSTREAM_PORT pair given")
    return pairs


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    try:
        pairs = parse_pairs(argv)
    except ValueError as exc:
        print(f"usage: pyfloor.py LISTEN_PORT:UPSTREAM_PORT ... ({exc})", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    serve(pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
