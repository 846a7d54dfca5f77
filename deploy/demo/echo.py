"""Demo backend for compose.yaml: a TCP or UDP echo server on one address (stdlib only).

    python3 echo.py tcp 127.0.0.1 7001
    python3 echo.py udp 127.0.0.1 5301
"""

from __future__ import annotations

import logging
import socketserver
import sys

logger = logging.getLogger(__name__)


class TCPEcho(socketserver.BaseRequestHandler):
    """Send every byte back until the client closes its side."""

    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class UDPEcho(socketserver.BaseRequestHandler):
    """Send each datagram back to its sender."""

    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("tcp", "udp"):
        print("usage: echo.py tcp|udp HOST PORT", file=sys.stderr)
        return 2
    proto, host, port = argv[0], argv[1], int(argv[2])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server: socketserver.BaseServer
    if proto == "tcp":
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        server = socketserver.ThreadingTCPServer((host, port), TCPEcho)
    else:
        server = socketserver.UDPServer((host, port), UDPEcho)
    logger.info("%s echo on %s:%d", proto, host, port)
    with server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
