"""Wake on demand (part of the convergence section): a sleeping route's first byte -> its echo,
next to the bare `docker start` -> listening time of the same container.

One busybox TCP echo (`nc -ll -e cat`, host network) labelled `proxy.idle_timeout` (1h: never
stopped by labelproxy here) behind one labelproxy. Each round:

- wake: the container is stopped and labelproxy shows the route `asleep`; a client connects,
  sends one byte and waits for it to come back (the start, the check that makes the backend
  ready (`healthcheck.interval` 0.1s, `rise` 1), the dial, the echo): first byte sent -> echo
  received;
- bare: the container is stopped again; `docker start` is issued and its target port polled
  (1 ms apart) until it accepts: start issued -> listening.

The container is killed (and labelproxy has seen it asleep) before each measurement.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

from bench.procs import BenchError, Children, tcp_accepts
from bench.targets import http_get, wait_ready_endpoint

logger = logging.getLogger(__name__)

LIMIT = 20.0
ALIAS = "wake"


def _labels(listen: int, target: int) -> dict[str, str]:
    return {
        "proxy.idle_timeout": "1h",
        f"proxy.{ALIAS}.port": f"{listen}:{target}",
        f"proxy.{ALIAS}.scheme": "tcp4",
        f"proxy.{ALIAS}.bind": "127.0.0.1",
        f"proxy.{ALIAS}.healthcheck.interval": "0.1s",
        f"proxy.{ALIAS}.healthcheck.rise": "1",
    }


def _wake_state(http_port: int) -> str:
    status, body = http_get(http_port, "/routes", timeout=2.0)
    if status != 200:
        return ""
    for route in json.loads(body).get("routes", []):
        if route.get("route") == ALIAS:
            return str((route.get("wake") or {}).get("state", ""))
    return ""


def _until(condition: Any, *, what: str) -> float:
    deadline = time.monotonic() + LIMIT
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {LIMIT:.0f}s waiting for {what}")
        time.sleep(0.001)
    return time.monotonic()


def _put_to_sleep(container: Any, http_port: int) -> None:
    container.kill()
    container.wait(timeout=LIMIT)
    deadline = time.monotonic() + LIMIT
    while _wake_state(http_port) != "asleep":
        if time.monotonic() > deadline:
            raise BenchError("labelproxy never showed the stopped container asleep")
        time.sleep(0.01)


def _first_echo(listen: int) -> float:
    """Seconds from the first byte sent to a sleeping route to its echo."""
    with socket.create_connection(("127.0.0.1", listen), timeout=LIMIT) as client:
        began = time.monotonic()
        client.sendall(b"x")
        if client.recv(1) != b"x":
            raise BenchError("the woken route did not echo the byte")
        return time.monotonic() - began


def measure(
    client: Any,
    image: str,
    *,
    children: Children,
    cmd: list[str],
    repo: Path,
    host: str,
    starts: int,
    ports: list[int],
    labelproxy: Any,
) -> tuple[list[float], list[float]]:
    """(wake first byte -> echo, bare start issued -> listening), in ms, `starts` rounds each.
    `labelproxy(children, cmd=, repo=, engine_host=, name=)` runs the process (convergence's)."""
    listen, target = ports
    container = client.containers.create(
        image, ["nc", "-ll", "-p", str(target), "-e", "cat"], labels=_labels(listen, target),
        network_mode="host", init=True, detach=True,
    )  # fmt: skip
    wakes: list[float] = []
    bare: list[float] = []
    try:
        with labelproxy(children, cmd=cmd, repo=repo, engine_host=host,
                        name="labelproxy-wake") as (proc, http_port):  # fmt: skip
            wait_ready_endpoint(http_port, deadline=time.monotonic() + 30,
                                alive=lambda: proc.poll() is None)  # fmt: skip
            _until(lambda: _wake_state(http_port) == "asleep", what="the route asleep")
            for _ in range(starts):
                wakes.append(_first_echo(listen) * 1e3)
                _put_to_sleep(container, http_port)
                issued = time.monotonic()
                container.start()
                listening = _until(lambda: tcp_accepts(target, timeout=0.05),
                                   what="the started container listening")  # fmt: skip
                bare.append((listening - issued) * 1e3)
                _put_to_sleep(container, http_port)
    finally:
        container.remove(force=True)
    return wakes, bare
