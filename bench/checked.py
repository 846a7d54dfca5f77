"""`labelproxy-checked` and `labelproxy-routes`: the relay target with 1,000 more routes, idle,
each with the default active check (`-checked`) or with checks off (`-routes`), to show what
checks cost the relay (issue 12: 1,000 routes with default checks must not move the benchmark's
relay figures). Their rows sit beside `labelproxy`'s in the same run (same routes, same
settings, started the same way): `-routes` vs `labelproxy` is what 1,000 more routes cost,
`-checked` vs `-routes` what their checks cost.

The 1,000 routes (`idle-0` ... `idle-999`, tcp4 on 127.0.0.1, consecutive listen ports) all
have one backend, a C echo server of their own (`check-sink`, not an upstream the loads use),
and no `healthcheck` field: the default `tcp` check, a connect every 5 s per route (about 200
checks a second, jittered). They are separate routes, not a port range (a range is checked
once). The target is measured once every route is up and every idle backend ready.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

from bench.procs import BenchError, Children, read_line

logger = logging.getLogger(__name__)

CHECKED_TARGET = "labelproxy-checked"
ROUTES_TARGET = "labelproxy-routes"
CHECKED_ROUTES = 1000
NOTE = (f"the labelproxy target plus {CHECKED_ROUTES:,} idle routes with the default active "
        "check (tcp connect every 5 s each, ~200 checks/s, to a sink of their own); measured "
        "once all are up and ready")
ROUTES_NOTE = (f"the labelproxy target plus {CHECKED_ROUTES:,} idle routes with checks off "
               "(`healthcheck: none`, to a sink of their own); measured once all are up")


def start_sink(children: Children, server: Path) -> int:
    """The idle routes' backend: the bench's C echo server on a port of its own."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    proc = children.start([str(server), "tcp-echo", str(port)], name="check-sink",
                          stdout_pipe=True)
    assert proc.stdout is not None
    read_line(proc.stdout, timeout=10.0)  # "ready" once bound
    return port


def free_run(count: int) -> int:
    """The first of `count` consecutive ports free on 127.0.0.1, below the ephemeral range and
    below the ports the test suite hands out (tests/support/ports.py: 20,000 up), so the
    bench smoke test never takes a port a test picked."""
    for _ in range(50):
        first = random.randrange(10_000, 20_000 - count)  # below the test suite's port pool
        socks: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise BenchError(f"no run of {count} consecutive free ports for {CHECKED_TARGET}")


def routes_yaml(*, sink_port: int, checks: bool = True) -> str:
    """The idle routes, as lines of the routes file's `routes:` mapping: with the default
    check, or with `healthcheck: none`."""
    first = free_run(CHECKED_ROUTES)
    off = "" if checks else ", healthcheck: none"
    return "".join(
        f'  idle-{i}: {{scheme: tcp4, bind: 127.0.0.1, port: "{first + i}:{sink_port}", '
        f"host: 127.0.0.1{off}}}\n"
        for i in range(CHECKED_ROUTES)
    )


def wait_checked(routes: Callable[[], tuple[int, bytes]], *, deadline: float) -> None:
    """Return once /routes shows every idle route up with its backend ready."""
    while True:
        status, body = routes()
        if status == 200:
            doc = json.loads(body)["routes"]
            idle = [r for r in doc if str(r["route"]).startswith("idle-")]
            ready = sum(1 for r in idle if r["state"] == "up"
                        and all(b.get("ready") for b in r["backends"]))
            if ready == CHECKED_ROUTES:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{CHECKED_TARGET}: the idle routes were not all up and ready "
                             f"in time (/routes {status})")
        time.sleep(0.2)
