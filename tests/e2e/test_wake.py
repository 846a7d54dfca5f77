"""Wake on demand on the private engine (issue 13): idle containers sleep, the first admitted
client wakes them and is served on its own connection, a denied client or a bare port scan
wakes nothing, dependencies start first, a container that never gets ready closes its held
clients at `wake_timeout`, and /routes shows a sleeping or waking route `up` all along.

One labelproxy process for the module; host-network containers of the Python base image
(tests/support/baseimage.py) run a small threaded echo server (TCP, or UDP) on loopback, and
busybox ones stand for dependencies; idle timeouts of 1 s and health checks every 0.1 s keep
each scenario to a few seconds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from labelproxy.cli import format_routes
from tests.support.baseimage import ensure_base_image
from tests.support.lp import (
    LabelproxyProcess,
    accepts,
    consecutive_free_ports,
    free_port,
    labelproxy,
    recv_all,
    wait_for,
)

pytestmark = pytest.mark.docker

Make = Callable[..., Any]
# a TCP (threaded, backlog 128) or UDP echo server on 127.0.0.1, listening after a delay:
# `python3 -c ECHO PORT tcp|udp DELAY`
ECHO = """
import socket, sys, threading
import time
port, udp, delay = int(sys.argv[1]), sys.argv[2] == "udp", float(sys.argv[3])
time.sleep(delay)  # a program that takes a while to listen
if udp:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
srv = socket.create_server(("127.0.0.1", port), backlog=128)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


@pytest.fixture(scope="module")
def lp(dockerd: Any) -> Iterator[LabelproxyProcess]:
    with labelproxy({"LABELPROXY_DOCKER_HOST": dockerd.host}) as proc:
        yield proc


@pytest.fixture(scope="module")
def python_image(dockerd: Any) -> str:
    return ensure_base_image(docker_host=dockerd.host)


@pytest.fixture
def make(dockerd: Any, busybox_image: str, python_image: str) -> Iterator[Make]:
    """Create (and start, unless told) a host-network container: an echo server (`echo`:
    its port), else busybox running `command`; removed after."""
    client = dockerd.client()
    made: list[Any] = []

    def create(labels: dict[str, str], command: list[str] | None = None, *, echo: int = 0,
               udp: bool = False, delay: float = 0.0, start: bool = True,
               name: str | None = None) -> Any:  # fmt: skip
        image, argv = busybox_image, command
        if echo:
            image = python_image
            argv = ["python3", "-c", ECHO, str(echo), "udp" if udp else "tcp", str(delay)]
        container = client.containers.create(
            image, argv, labels=labels, name=name, init=True, network_mode="host"
        )
        made.append(container)
        if start:
            container.start()
        return container

    yield create
    for container in made:
        with contextlib.suppress(Exception):
            container.remove(force=True)


def status(container: Any) -> str:
    container.reload()
    return str(container.attrs["State"]["Status"])


def wake_state(lp: LabelproxyProcess, alias: str) -> str | None:
    route = lp.route(alias)
    return None if route is None or "wake" not in route else str(route["wake"]["state"])


def shows(lp: LabelproxyProcess, alias: str, state: str) -> bool:
    return wake_state(lp, alias) == state


def echo_labels(alias: str, listen: int, target: int, **extra: str) -> dict[str, str]:
    labels = {
        f"proxy.{alias}.port": f"{listen}:{target}", f"proxy.{alias}.bind": "127.0.0.1",
        f"proxy.{alias}.scheme": "tcp4", f"proxy.{alias}.healthcheck.interval": "0.1s",
    }  # fmt: skip
    labels.update({f"proxy.{k}": v for k, v in extra.items()})
    return labels


def roundtrip(port: int, payload: bytes, *, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15.0,
                                  source_address=(source, 0)) as s:  # fmt: skip
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def starts(dockerd: Any, container: Any, since: float) -> int:
    """How many `start` (and `unpause`) events the engine sent for `container` since."""
    events = dockerd.client().api.events(
        since=since, until=time.time() + 0.01, decode=True,
        filters={"container": container.id, "event": ["start", "unpause"]},
    )  # fmt: skip
    return sum(1 for _ in events)


def test_idle_container_sleeps_and_twenty_clients_wake_it_once_served_on_their_connection(
    lp: LabelproxyProcess, make: Make, dockerd: Any
) -> None:
    listen, target = free_port(), free_port()
    container = make(echo_labels("sleepy", listen, target, idle_timeout="1s"), echo=target)
    wait_for(lambda: wake_state(lp, "sleepy") == "ready", what="the route up and awake")
    ids = {"route": "sleepy", "listen": f"tcp://127.0.0.1:{listen}"}
    # an open idle connection keeps it awake, well past its idle_timeout
    with socket.create_connection(("127.0.0.1", listen), timeout=10.0):
        wait_for(lambda: lp.metric("labelproxy_connections_active", **ids) == 1,
                 what="the idle connection open")  # fmt: skip
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:  # polled for 2.5 s (2.5x idle_timeout): awake
            assert status(container) == "running"
            time.sleep(0.1)
    wait_for(lambda: status(container) == "exited", what="the idle container stopped")
    wait_for(lambda: wake_state(lp, "sleepy") == "asleep", what="the route asleep")
    doc = lp.routes()  # still up and bound, asleep, and `labelproxy routes` says so
    route = next(r for r in doc["routes"] if r["route"] == "sleepy")
    assert route["state"] == "up" and route["bound"] and "up (asleep)" in format_routes(doc)
    assert lp.metric("labelproxy_sleeps_total", **ids, method="stop") == 1
    wait_for(lambda: lp.metric("labelproxy_route_asleep", **ids) == 1, what="asleep gauge 1")

    since = time.time()
    answers: dict[int, bytes] = {}
    errors: list[str] = []

    def client(n: int) -> None:
        try:
            answers[n] = roundtrip(listen, f"client {n}".encode())
        except OSError as exc:
            errors.append(f"{n}: {exc!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert answers == {n: f"client {n}".encode() for n in range(20)}
    assert starts(dockerd, container, since) == 1
    assert lp.metric("labelproxy_wakes_total", **ids, result="ok") == 1
    assert lp.metric("labelproxy_held_clients", **ids) == 0
    assert (lp.metric("labelproxy_wake_duration_seconds_count") or 0) >= 1
    assert not lp.metric("labelproxy_connections_rejected_total", **ids, reason="no_backend")
    assert "woke container" in lp.log()
    wait_for(lambda: lp.metric("labelproxy_route_asleep", **ids) == 0, what="asleep gauge 0")


RANGE = 256  # ports: a pass that updates them takes a few turns of the loop (/routes answers)


def test_a_route_stays_up_on_routes_while_its_container_sleeps_and_wakes(
    lp: LabelproxyProcess, make: Make
) -> None:
    first = consecutive_free_ports(2 * RANGE)  # listen ports, then target ports
    target, last = first + RANGE, first + 2 * RANGE - 1
    labels = echo_labels("dozy", first, target, idle_timeout="1s")
    labels["proxy.dozy.port"] = f"{first}-{target - 1}:{target}-{last}"
    container = make(labels, echo=target)  # the range is checked on its first port

    def routes() -> list[dict[str, Any]]:
        return [r for r in lp.routes()["routes"] if r["route"] == "dozy"]

    wait_for(lambda: [(r["state"], r["wake"]["state"], len(r["backends"])) for r in routes()]
             == [("up", "ready", 1)] * RANGE, what="the range up and awake")  # fmt: skip
    shown: list[tuple[str, str, int]] = []  # a `dozy` route not up: state, wake, backends
    polls = 0
    done = threading.Event()

    def poll() -> None:  # as an operator's script does, until done (bounded: 30 s)
        nonlocal polls
        deadline = time.monotonic() + 30.0
        while not done.is_set() and time.monotonic() < deadline:
            body = lp.get("/routes")[1]
            polls += 1
            if b'"state": "pending"' in body or b'"state": "error"' in body:
                shown.extend((r["state"], r["wake"]["state"], len(r["backends"]))
                             for r in json.loads(body)["routes"]
                             if r["route"] == "dozy" and r["state"] != "up")  # fmt: skip

    pollers = [threading.Thread(target=poll) for _ in range(3)]
    for t in pollers:
        t.start()
    try:
        wait_for(lambda: status(container) == "exited", what="the idle container stopped")
        wait_for(lambda: {(r["wake"]["state"], len(r["backends"])) for r in routes()}
                 == {("asleep", 0)}, what="the pass after the sleep")  # fmt: skip
        assert roundtrip(first, b"wake up") == b"wake up"
        wait_for(lambda: {(r["wake"]["state"], len(r["backends"])) for r in routes()}
                 == {("ready", 1)}, what="the pass after the wake")  # fmt: skip
    finally:
        done.set()
        for t in pollers:
            t.join(timeout=35)
    assert polls > 20  # /routes was read all through the sleep and the wake
    assert not shown, sorted(set(shown))  # never pending (nor error) once up


def test_a_client_during_the_stop_waits_for_it_then_wakes_the_container(
    lp: LabelproxyProcess, make: Make, dockerd: Any
) -> None:
    listen, target = free_port(), free_port()
    labels = echo_labels("racy", listen, target, idle_timeout="1s", stop_timeout="2s")
    # ignores SIGTERM: the stop takes its whole 2 s grace, then kills
    command = ["sh", "-c", f"trap '' TERM; exec nc -ll -p {target} -e cat"]
    container = make(labels, command)
    wait_for(lambda: wake_state(lp, "racy") == "stopping", what="the idle container stopping")
    since = time.time()
    assert roundtrip(listen, b"not too late") == b"not too late"
    ids = {"route": "racy", "listen": f"tcp://127.0.0.1:{listen}"}
    assert lp.metric("labelproxy_sleeps_total", **ids, method="stop") == 1
    assert lp.metric("labelproxy_wakes_total", **ids, result="ok") == 1
    events = dockerd.client().api.events(
        since=since, until=time.time() + 0.01, decode=True,
        filters={"container": container.id, "event": ["die", "start"]},
    )  # fmt: skip
    assert [e["status"] for e in events] == ["die", "start"]  # the stop ended, then a start


def test_denied_client_and_bare_connect_wake_nothing_then_data_wakes_and_pause_sleeps(
    lp: LabelproxyProcess, make: Make, dockerd: Any
) -> None:
    listen, target = free_port(), free_port()
    labels = echo_labels("scan", listen, target, idle_timeout="1s", stop_method="pause",
                         wake_on="data", **{"scan.allow": "127.0.0.2/32"})  # fmt: skip
    container = make(labels, echo=target, start=False)  # created, never started: asleep
    wait_for(lambda: wake_state(lp, "scan") == "asleep", what="the route bound, asleep")
    ids = {"route": "scan", "listen": f"tcp://127.0.0.1:{listen}"}
    # denied by the ACL: refused before anything else
    with socket.create_connection(("127.0.0.1", listen), timeout=5.0) as denied:
        denied.sendall(b"let me in")
        with contextlib.suppress(ConnectionResetError):
            assert denied.recv(1) == b""
    wait_for(lambda: lp.metric("labelproxy_connections_rejected_total", **ids, reason="acl") == 1,
             what="the denied client counted")  # fmt: skip
    # admitted, but connects and closes without a byte: a port scan
    with socket.create_connection(("127.0.0.1", listen), timeout=5.0,
                                  source_address=("127.0.0.2", 0)):  # fmt: skip
        wait_for(lambda: lp.metric("labelproxy_held_clients", **ids) == 1, what="held")
    wait_for(lambda: lp.metric("labelproxy_connections_active", **ids) == 0
             and lp.metric("labelproxy_held_clients", **ids) == 0,
             what="the scan's connection over")  # fmt: skip
    assert status(container) == "created"
    assert not lp.metric("labelproxy_wakes_total", **ids, result="ok")
    # the first byte wakes it; stop_method pause puts it to sleep again, a client unpauses it
    assert roundtrip(listen, b"hello", source="127.0.0.2") == b"hello"
    wait_for(lambda: status(container) == "paused", what="the idle container paused")
    wait_for(lambda: wake_state(lp, "scan") == "asleep", what="the paused route asleep")
    assert lp.metric("labelproxy_sleeps_total", **ids, method="pause") == 1
    assert roundtrip(listen, b"again", source="127.0.0.2") == b"again"
    assert lp.metric("labelproxy_wakes_total", **ids, result="ok") == 2


def test_dependencies_start_first_and_held_clients_close_at_wake_timeout(
    lp: LabelproxyProcess, make: Make
) -> None:
    listen, target = free_port(), free_port()
    suffix = str(listen)
    first = make({}, ["sleep", "600"], start=False, name=f"wake-dep-a-{suffix}")
    second = make({}, ["sleep", "600"], start=False, name=f"wake-dep-b-{suffix}")
    labels = echo_labels("never", listen, target, idle_timeout="1m", wake_timeout="1s",
                         depends_on=f"wake-dep-a-{suffix},wake-dep-b-{suffix}")  # fmt: skip
    main = make(labels, ["sleep", "600"], start=False)  # starts, never listens
    wait_for(lambda: wake_state(lp, "never") == "asleep", what="the route asleep")
    ids = {"route": "never", "listen": f"tcp://127.0.0.1:{listen}"}
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", listen), timeout=10.0) as held:
        held.sendall(b"anyone?")
        with contextlib.suppress(ConnectionResetError):
            assert held.recv(1) == b""
    assert 0.8 <= time.monotonic() - began < 8.0
    wait_for(lambda: lp.metric("labelproxy_wakes_total", **ids, result="timeout") == 1,
             what="the failed wake counted")  # fmt: skip
    assert lp.metric("labelproxy_connections_rejected_total", **ids, reason="no_backend") == 1
    started = []
    for container in (first, second, main):
        assert status(container) == "running"
        started.append(container.attrs["State"]["StartedAt"])
    assert started == sorted(started)  # in depends_on order, the container last


def udp_labels(alias: str, listen: int, target: int, **extra: str) -> dict[str, str]:
    labels = {
        f"proxy.{alias}.port": f"{listen}:{target}", f"proxy.{alias}.bind": "127.0.0.1",
        f"proxy.{alias}.scheme": "udp4", f"proxy.{alias}.idle_timeout": "1s",
        f"proxy.{alias}.healthcheck": "send_expect", f"proxy.{alias}.healthcheck.send": "ping",
        f"proxy.{alias}.healthcheck.expect": "ping",
        f"proxy.{alias}.healthcheck.interval": "0.1s",
    }  # fmt: skip
    labels.update({f"proxy.{k}": v for k, v in extra.items()})
    return labels


def udp_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5.0)
        s.sendto(payload, ("127.0.0.1", port))
        return s.recv(65535)


def test_udp_datagrams_sent_while_asleep_are_answered_in_order_others_unaffected(
    lp: LabelproxyProcess, make: Make
) -> None:
    listen, target = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    other, other_target = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    make(udp_labels("plain", other, other_target), echo=other_target, udp=True)
    # asleep from the start; once started, its program takes 2 s to listen
    container = make(udp_labels("game", listen, target, idle_timeout="1s"), echo=target,
                     udp=True, delay=2.0, start=False)  # fmt: skip
    wait_for(lambda: wake_state(lp, "game") == "asleep", what="the udp route asleep")
    wait_for(lambda: udp_roundtrip(other, b"warm") == b"warm", what="the plain route")
    ids = {"route": "game", "listen": f"udp://127.0.0.1:{listen}"}
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for n in range(5):
            for i, c in enumerate(clients):
                c.sendto(f"c{i} #{n}".encode(), ("127.0.0.1", listen))
        wait_for(lambda: lp.metric("labelproxy_held_clients", **ids) == 2, what="both held")
        # while the game wakes, the other route answers at once
        began = time.monotonic()
        assert udp_roundtrip(other, b"meanwhile") == b"meanwhile"
        assert time.monotonic() - began < 1.0
        assert lp.metric("labelproxy_held_clients", **ids) == 2  # still waking
        for i, c in enumerate(clients):
            c.settimeout(15.0)
            got = [c.recv(65535) for _ in range(5)]
            assert got == [f"c{i} #{n}".encode() for n in range(5)]
    finally:
        for c in clients:
            c.close()
    assert status(container) == "running"
    assert lp.metric("labelproxy_wakes_total", **ids, result="ok") == 1
    assert not lp.metric("labelproxy_udp_dropped_total", **ids, reason="limit")
    # once the sessions expire (1 s) and nothing moves for idle_timeout, it sleeps again
    wait_for(lambda: status(container) == "exited", what="the udp container asleep again")


# a read-only socket proxy, as tecnativa/docker-socket-proxy builds one from haproxy
READ_ONLY_PROXY = """
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend docker
  bind 127.0.0.1:{port}
  http-request deny if {{ method POST }}
  default_backend engine
backend engine
  server engine {socket}
"""


@pytest.fixture
def read_only_engine(dockerd: Any, tmp_path: Path) -> Iterator[str]:
    """The private engine behind a haproxy that refuses every POST (403): its tcp:// URL."""
    haproxy = shutil.which("haproxy") or pytest.skip("haproxy is not installed")
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(READ_ONLY_PROXY.format(port=port, socket=dockerd.socket_path))
    proc = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: accepts(port), what="the socket proxy listening")
        yield f"tcp://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_start_or_stop_the_engine_refuses_shows_on_the_route_and_closes_held_clients(
    read_only_engine: str, make: Make
) -> None:
    listen, target = free_port(), free_port()
    labels = {k.replace("proxy.", "ro.", 1): v
              for k, v in echo_labels("locked", listen, target, idle_timeout="1m").items()}
    container = make(labels, echo=target, start=False)
    idle_port, idle_target = free_port(), free_port()
    running = make({k.replace("proxy.", "ro.", 1): v for k, v in echo_labels(
        "awake", idle_port, idle_target, idle_timeout="1s").items()}, echo=idle_target)
    env = {"LABELPROXY_DOCKER_HOST": read_only_engine, "LABELPROXY_LABEL_PREFIX": "ro"}
    with labelproxy(env) as ro:
        wait_for(lambda: wake_state(ro, "locked") == "asleep", what="the route asleep")
        # the idle one cannot be put to sleep: said on its route, it keeps running
        wait_for(lambda: "stop refused (HTTP 403)" in ((ro.route("awake") or {}).get(
            "wake") or {}).get("error", ""), what="the refused stop on the route")
        assert wake_state(ro, "awake") == "ready" and status(running) == "running"
        assert "cannot put it to sleep" in ro.log()
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", listen), timeout=10.0) as client:
            client.sendall(b"wake up")
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(1) == b""
        assert time.monotonic() - began < 5.0  # at once, not at the 3 min wake_timeout
        ids = {"route": "locked", "listen": f"tcp://127.0.0.1:{listen}"}
        assert ro.metric("labelproxy_wakes_total", **ids, result="refused") == 1
        route = ro.route("locked")
        assert route is not None and "refused (HTTP 403)" in route["wake"]["error"]
        assert "WAKE ON DEMAND FAILING" in format_routes(ro.routes())
        assert "cannot wake container" in ro.log() and "ALLOW_START=1" in ro.log()
    assert status(container) == "created"


def test_restarting_labelproxy_wakes_nothing_and_stops_nothing(
    dockerd: Any, make: Make
) -> None:
    awake_port, awake_target = free_port(), free_port()
    asleep_port, asleep_target = free_port(), free_port()

    def own(labels: dict[str, str]) -> dict[str, str]:
        return {k.replace("proxy.", "rs.", 1): v for k, v in labels.items()}

    running = make(own(echo_labels("up", awake_port, awake_target, idle_timeout="1m")),
                   echo=awake_target)  # fmt: skip
    stopped = make(own(echo_labels("down", asleep_port, asleep_target, idle_timeout="1m")),
                   echo=asleep_target, start=False)  # fmt: skip
    since = time.time()
    env = {"LABELPROXY_DOCKER_HOST": dockerd.host, "LABELPROXY_LABEL_PREFIX": "rs"}
    for _ in range(2):  # a start, then a restart
        with labelproxy(env) as proc:
            states = {"up": "ready", "down": "asleep"}
            for alias, state in states.items():
                wait_for(functools.partial(shows, proc, alias, state), what=f"{alias} {state}")
    assert (status(running), status(stopped)) == ("running", "created")
    assert starts(dockerd, stopped, since) == 0
