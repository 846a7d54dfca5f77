"""The TCP data plane: its own epoll thread (`loop`), listeners (`server`), dials, relays;
listeners shared by routes chosen by name (`names`)."""

from labelproxy.streams.tcp.names import serve_named
from labelproxy.streams.tcp.server import serve_tcp

__all__ = ["serve_named", "serve_tcp"]
