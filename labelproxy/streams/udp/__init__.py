"""The UDP data plane: listeners and session relays on the asyncio loop (`server`)."""

from labelproxy.streams.udp.server import serve_udp

__all__ = ["serve_udp"]
