"""The UDP data plane: listeners and session relays on the asyncio loop (`server`)."""
