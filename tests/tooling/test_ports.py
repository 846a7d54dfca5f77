"""The suite's free-port helper (tests/support/ports.py): ports below the ephemeral range, each
handed out once across processes (as the two pytest-xdist workers are), free when handed out."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys

from tests.support.ports import (
    FIRST,
    TCP_AND_UDP,
    bindable,
    consecutive_free_ports,
    ephemeral_range,
    free_port,
)

# a process that takes 100 ports, says which, and lives (holding its claim) until stdin closes
TAKE = (
    "import json, sys; from tests.support.ports import free_port; "
    "print(json.dumps([free_port() for _ in range(100)]), flush=True); sys.stdin.read()"
)


def test_ports_are_below_the_ephemeral_range_and_never_handed_out_twice() -> None:
    low, _ = ephemeral_range()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", TAKE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]  # two processes at once, as the xdist workers: each claims its own blocks
    mine = [free_port() for _ in range(100)] + [free_port(socket.SOCK_DGRAM) for _ in range(50)]
    first = consecutive_free_ports(200)
    mine += range(first, first + 200)
    theirs = []
    for child in children:
        assert child.stdout is not None
        assert select.select([child.stdout], [], [], 30)[0], "a child took no ports in 30 s"
        theirs += json.loads(child.stdout.readline())
    for child in children:
        child.communicate(timeout=30)
        assert child.returncode == 0
    every = mine + theirs
    assert len(set(every)) == len(every) == 550
    assert all(FIRST <= port < low for port in every)


def test_a_port_in_use_is_skipped_for_its_kind_and_host() -> None:
    with socket.create_server(("127.0.0.1", free_port())) as held:
        port = held.getsockname()[1]
        assert not bindable(port, [socket.SOCK_STREAM], "127.0.0.1", reuse_addr=True)
        assert not bindable(port, TCP_AND_UDP, "127.0.0.1", reuse_addr=False)
        assert not bindable(port, [socket.SOCK_STREAM], "::", reuse_addr=False)  # both stacks
        assert bindable(port, [socket.SOCK_DGRAM], "127.0.0.1", reuse_addr=False)
    assert bindable(port, TCP_AND_UDP, "127.0.0.1", reuse_addr=False)
    udp = free_port(TCP_AND_UDP)
    assert bindable(udp, TCP_AND_UDP, "127.0.0.1", reuse_addr=False)
