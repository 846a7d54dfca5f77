"""The TCP data plane: its own epoll thread (`loop`), listeners (`server`), dials, relays."""

from labelproxy.streams.tcp.server import serve_tcp

__all__ = ["serve_tcp"]
