"""How long a big port range stalls the relays of other routes while it is added and removed.

A labelproxy process serves two probe routes (UDP and TCP echo on 127.0.0.1); a client sends a
round trip through each every 2 ms. Then a route with a range of `--ports` ports (default
5,000) is added and, once it is up, removed again: from the routes file, or with `--docker`
as a container labelled `proxy.x.port: 20000-24999:30000-34999` on a private dockerd. It
prints, per probe, the longest round trip and the longest gap between two answers before,
while adding and while removing, and how many log lines each step wrote.

    python -m bench.range_stall [--ports 5000] [--docker]

Run it as root from the repository root. `--docker` starts the suite's private engine: run it
inside a network namespace of your own (`ip netns add lpstall; ip netns exec lpstall ip link
set lo up; nsenter --net=/run/netns/lpstall python -m bench.range_stall --docker`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support.lp import LabelproxyProcess, TcpEcho, UdpEcho, free_port, wait_for
from tests.support.lp import write_routes as write

logger = logging.getLogger(__name__)

FIRST_PORT = 20_000
TARGET_OFFSET = 10_000  # the range's targets: nothing listens there, nothing dials them


class Prober:
    """Round trips through one route, one every 2 ms, on a thread of its own."""

    def __init__(self, kind: str, port: int) -> None:
        self.kind = kind
        self.port = port
        self.samples: list[tuple[float, float]] = []  # (sent at, round trip)
        self.lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        if self.kind == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(("127.0.0.1", self.port))
        else:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(3.0)
        with sock:
            for n in range(1, 10**9):
                if self._stop.is_set():
                    return
                message = n.to_bytes(4, "big")
                sent = time.monotonic()
                sock.send(message)
                try:
                    while sock.recv(100)[-4:] != message:
                        pass
                except TimeoutError:
                    self.lost += 1
                    continue
                self.samples.append((sent, time.monotonic() - sent))
                time.sleep(0.002)

    def window(self, start: float, end: float) -> str:
        rtts = [r for t, r in self.samples if start <= t <= end]
        done = [t + r for t, r in self.samples if start <= t <= end]
        gap = max((b - a for a, b in itertools.pairwise(done)), default=0.0)
        return f"max round trip {max(rtts, default=0) * 1000:.0f} ms, max gap {gap * 1000:.0f} ms"


def _range(ports: int) -> str:
    last = FIRST_PORT + ports - 1
    return f"{FIRST_PORT}-{last}:{FIRST_PORT + TARGET_OFFSET}-{last + TARGET_OFFSET}"


def _logged(lp: LabelproxyProcess, what: str, ports: int) -> bool:
    """The range's `what` line (one per range) or, from a version that logs each port, all."""
    text = lp.log_path.read_text()
    return f"{what} ({ports} ports)" in text or text.count(f" {what} route=x ") >= ports


@contextlib.contextmanager
def _container_range(ports: int) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A private dockerd; (its host, add the range container, remove it)."""
    from tests.support.dockerd import PrivateDockerd, build_busybox_image  # noqa: PLC0415

    engine = PrivateDockerd()
    engine.start()
    try:
        client = engine.client()
        image = build_busybox_image(client)
        labels = {
            "proxy.x.port": _range(ports),
            "proxy.x.scheme": "tcp4",
            "proxy.x.bind": "127.0.0.1",
        }
        made: list[object] = []

        def add() -> None:
            made.append(client.containers.run(image, ["sleep", "600"], detach=True, init=True,
                                              network_mode="host", labels=labels))  # fmt: skip

        def remove() -> None:
            made.pop().remove(force=True)  # type: ignore[attr-defined]

        yield engine.host, add, remove
    finally:
        engine.cleanup()


def measure(ports: int, *, docker: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="range-stall-"))
    routes = tmp / "routes.yml"
    udp_echo, tcp_echo = UdpEcho(), TcpEcho()
    probes_ports = {"udp": free_port(socket.SOCK_DGRAM), "tcp": free_port()}
    base: dict[str, dict[str, object]] = {
        f"probe-{kind}": {"scheme": f"{kind}4", "bind": "127.0.0.1", "host": "127.0.0.1",
                          "port": f"{port}:{(udp_echo if kind == 'udp' else tcp_echo).port}"}
        for kind, port in probes_ports.items()
    }  # fmt: skip
    big: dict[str, dict[str, object]] = {
        **base, "x": {"scheme": "tcp4", "bind": "127.0.0.1", "host": "127.0.0.1",
                      "port": _range(ports)},
    }  # fmt: skip
    write(routes, base)
    with contextlib.ExitStack() as stack:
        env = {"LABELPROXY_DOCKER_HOST": "none", "LABELPROXY_ROUTES_FILE": str(routes),
               "LABELPROXY_LOG_LEVEL": "info"}  # fmt: skip
        if docker:
            host, add, remove = stack.enter_context(_container_range(ports))
            env["LABELPROXY_DOCKER_HOST"] = host
        else:

            def add() -> None:
                write(routes, big)

            def remove() -> None:
                write(routes, base)

        lp = LabelproxyProcess(env, log_path=tmp / "labelproxy.log")
        stack.callback(lp.stop)
        stack.callback(udp_echo.close)
        stack.callback(tcp_echo.close)
        lp.wait_ready()
        probes = [Prober(kind, port) for kind, port in probes_ports.items()]
        time.sleep(2.0)
        lines = [len(lp.log_path.read_text().splitlines())]
        t_add = time.monotonic()
        add()
        wait_for(lambda: _logged(lp, "route up", ports), timeout=120, what="the range up")
        t_up = time.monotonic()
        time.sleep(2.0)
        lines.append(len(lp.log_path.read_text().splitlines()))
        t_remove = time.monotonic()
        remove()
        wait_for(lambda: _logged(lp, "route down", ports), timeout=120, what="the range down")
        t_down = time.monotonic()
        time.sleep(2.0)
        lines.append(len(lp.log_path.read_text().splitlines()))
        for probe in probes:
            probe.stop()
        source = "container" if docker else "routes file"
        print(f"{ports}-port range from a {source}: up in {t_up - t_add:.1f} s, "
              f"down in {t_down - t_remove:.1f} s; log lines: adding {lines[1] - lines[0]}, "
              f"removing {lines[2] - lines[1]}")  # fmt: skip
        for probe in probes:
            removing = probe.window(t_remove, t_down + 2.0)
            print(f"  {probe.kind}: before: {probe.window(t_add - 2.0, t_add)}; "
                  f"adding: {probe.window(t_add, t_up + 2.0)}; removing: {removing}; "
                  f"lost {probe.lost}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.range_stall", description=__doc__)
    parser.add_argument("--ports", type=int, default=5000, help="ports in the range")
    parser.add_argument("--docker", action="store_true", help="add it as a container")
    args = parser.parse_args()
    measure(args.ports, docker=args.docker)


if __name__ == "__main__":
    main()
