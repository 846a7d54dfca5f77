"""The TCP data plane: its own epoll thread (`loop`), listeners (`server`), dials, relays."""
