"""Backends that are really up, in a real labelproxy process (issue 12): a client that comes
before its backend listens is held and served, a backend that stops listening leaves the
pool (active checks) or is ejected after failed dials (passive) while clients see no error,
and the last backend is never ejected on passive evidence.

Backends are the test's own echo servers on loopback (routes file), or a busybox container
on the host network of the suite's private engine; intervals are short (0.1-0.2 s).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labelproxy.cli import format_routes
from tests.support.lp import (
    LabelproxyProcess,
    TcpEcho,
    echo_roundtrip,
    free_port,
    labelproxy,
    recv_all,
    wait_for,
    write_routes,
)

ROUTE = {"scheme": "tcp4", "bind": "127.0.0.1"}


@pytest.fixture
def process(tmp_path: Path) -> Iterator[Any]:
    """Start labelproxy on a routes file; stopped by PID after the test."""
    started: list[LabelproxyProcess] = []

    def start(routes: dict[str, dict[str, Any]]) -> LabelproxyProcess:
        path = tmp_path / "routes.yaml"
        write_routes(path, routes)
        lp = LabelproxyProcess({"LABELPROXY_DOCKER_HOST": "none",
                                "LABELPROXY_ROUTES_FILE": str(path)})  # fmt: skip
        started.append(lp)
        lp.wait_ready()
        return lp

    yield start
    for lp in started:
        lp.stop()


@contextlib.contextmanager
def echoes(*ports: int) -> Iterator[list[TcpEcho]]:
    servers = [TcpEcho(port) for port in ports]
    try:
        yield servers
    finally:
        for server in servers:
            server.close()


def backends(lp: LabelproxyProcess, alias: str) -> dict[str, dict[str, Any]]:
    route = lp.route(alias)
    assert route is not None
    return {b["address"]: b for b in route["backends"]}


def ready(lp: LabelproxyProcess, alias: str) -> set[str]:
    return {address for address, b in backends(lp, alias).items() if b["ready"]}


def served(port: int, payload: bytes) -> bool:
    try:
        return echo_roundtrip(port, payload) == payload
    except OSError:
        return False


def test_a_client_that_comes_before_its_backend_listens_is_held_then_served(
    process: Any,
) -> None:
    listen, target = free_port(), free_port()
    lp = process({"late": {**ROUTE, "port": f"{listen}:{target}", "host": "127.0.0.1",
                           "connect_timeout": "10s", "healthcheck.interval": "0.1s"}})  # fmt: skip
    ids = {"route": "late", "listen": f"tcp://127.0.0.1:{listen}"}
    with socket.create_connection(("127.0.0.1", listen), timeout=10.0) as client:
        client.sendall(b"early bytes")
        # held (before: dialled at once, refused, closed): the backend fails its checks
        wait_for(lambda: backends(lp, "late")[f"127.0.0.1:{target}"]["last_result"] == "fail",
                 what="a failed check while the client waits")  # fmt: skip
        assert lp.metric("labelproxy_connections_active", **ids) == 1
        assert lp.metric("labelproxy_backend_up", **ids, backend=f"127.0.0.1:{target}") == 0
        with echoes(target):
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"early bytes"
    assert lp.metric("labelproxy_upstream_dial_errors_total", **ids) == 0
    assert lp.metric("labelproxy_connections_rejected_total", **ids, reason="no_backend") == 0
    assert (lp.metric("labelproxy_health_checks_total", **ids, result="fail") or 0) >= 1
    assert lp.metric("labelproxy_backend_up", **ids, backend=f"127.0.0.1:{target}") == 1


def test_a_held_client_is_refused_no_backend_after_the_connect_timeout(process: Any) -> None:
    listen, target = free_port(), free_port()
    lp = process({"never": {**ROUTE, "port": f"{listen}:{target}", "host": "127.0.0.1",
                            "connect_timeout": "0.5s", "healthcheck.interval": "0.1s"}},
                 )  # fmt: skip
    began = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", listen), timeout=10.0) as client,
        contextlib.suppress(ConnectionResetError),
    ):
        assert client.recv(1) == b""
    assert 0.4 <= time.monotonic() - began < 5.0
    ids = {"route": "never", "listen": f"tcp://127.0.0.1:{listen}"}
    wait_for(lambda: lp.metric("labelproxy_connections_rejected_total", **ids,
                               reason="no_backend") == 1, what="the refusal counted")  # fmt: skip
    assert lp.metric("labelproxy_upstream_dial_errors_total", **ids) == 0  # never dialled
    text = format_routes(lp.routes())
    assert "BACKENDS NOT READY" in text and f"127.0.0.1:{target}: starting" in text, text


class Clients:
    """Clients in a thread, one after another (bounded in count and time): every one must
    get its bytes back."""

    def __init__(self, port: int, *, pace: float, limit: int = 2000) -> None:
        self.port = port
        self.pace = pace
        self.limit = limit
        self.served = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        # held by the test around a change no client may straddle (see the test)
        self.between = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and self.served < self.limit:
            if time.monotonic() > deadline:
                return
            payload = b"n%d" % self.served
            try:
                with self.between:
                    got = echo_roundtrip(self.port, payload)
            except OSError as exc:
                got = repr(exc).encode()
            if got != payload:
                self.errors.append(got.decode(errors="replace"))
            self.served += 1
            self._stop.wait(self.pace)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_a_replica_that_stops_listening_leaves_the_pool_and_returns_unnoticed(
    process: Any,
) -> None:
    listen = free_port()
    ports = [free_port() for _ in range(3)]
    interval, fall, rise = 0.2, 2, 2
    with echoes(*ports) as servers:
        lp = process({"pool": {
            **ROUTE, "port": str(listen), "hosts": [f"127.0.0.1:{p}" for p in ports],
            "healthcheck.interval": f"{interval}s", "healthcheck.fall": str(fall),
            "healthcheck.rise": str(rise),
        }})  # fmt: skip
        addresses = {f"127.0.0.1:{p}" for p in ports}
        wait_for(lambda: ready(lp, "pool") == addresses, what="three ready replicas")
        # one client each 0.1 s: the stopped replica is picked every third, so the checks
        # see it down before three failed dials in a row would eject it (10 s off)
        clients = Clients(listen, pace=0.1)
        try:
            wait_for(lambda: clients.served >= 5, what="clients served")
            # it stops listening between two clients: one that labelproxy dialled into its
            # accept backlog just as it closed would be reset with its bytes sent (no proxy
            # may replay those); every client after it must be served
            with clients.between:
                servers[1].stop_listening()
            began = time.monotonic()
            wait_for(lambda: ready(lp, "pool") == addresses - {f"127.0.0.1:{ports[1]}"},
                     timeout=10, what="the stopped replica out of the pool")  # fmt: skip
            left_after = time.monotonic() - began
            assert left_after < fall * interval * 1.1 + interval + 0.5  # + its check, polling
            down = backends(lp, "pool")[f"127.0.0.1:{ports[1]}"]
            assert down["state"] == "down" and "refused" in down["last_error"].lower(), down
            count = clients.served
            wait_for(lambda: clients.served >= count + 5, what="clients served meanwhile")
            servers[1] = TcpEcho(ports[1])  # listens again
            began = time.monotonic()
            wait_for(lambda: ready(lp, "pool") == addresses, timeout=10,
                     what="the replica back after rise passes")  # fmt: skip
            assert time.monotonic() - began >= (rise - 1) * interval * 0.9
            count = clients.served
            wait_for(lambda: clients.served >= count + 5, what="clients served after")
        finally:
            clients.stop()
        assert clients.errors == []
        assert servers[1].accepted > 0  # it is really used again
        log = lp.log()
        assert log.count("backend not ready") == 1, log  # one line per change, not per check
        assert log.count("backend ready") == 3 + 1, log


def test_failed_dials_eject_a_backend_with_checks_off_and_clients_see_no_error(
    process: Any,
) -> None:
    listen, dead = free_port(), free_port()
    with echoes(free_port(), free_port()) as servers:
        hosts = [f"127.0.0.1:{s.port}" for s in servers] + [f"127.0.0.1:{dead}"]
        lp = process({"pool": {**ROUTE, "port": str(listen), "hosts": hosts,
                               "healthcheck": "none"}})  # fmt: skip
        ids = {"route": "pool", "listen": f"tcp://127.0.0.1:{listen}"}
        for n in range(30):
            assert served(listen, b"c%d" % n)
            if lp.metric("labelproxy_backend_ejections_total", **ids) == 1:
                break
        assert lp.metric("labelproxy_backend_ejections_total", **ids) == 1
        ejected = backends(lp, "pool")[f"127.0.0.1:{dead}"]
        assert (ejected["ready"], ejected["state"]) == (False, "ejected")
        assert ejected["ejected_until"] is not None
        assert lp.metric("labelproxy_upstream_dial_errors_total", **ids) == 3
        assert lp.metric("labelproxy_backend_up", **ids, backend=f"127.0.0.1:{dead}") == 0
        for n in range(9):  # the ejected backend is not dialled any more
            assert served(listen, b"d%d" % n)
        assert lp.metric("labelproxy_upstream_dial_errors_total", **ids) == 3
        assert lp.metric("labelproxy_health_checks_total", **ids, result="pass") is None


def test_the_last_backend_is_never_ejected_on_passive_evidence(process: Any) -> None:
    listen, target = free_port(), free_port()
    lp = process({"one": {**ROUTE, "port": f"{listen}:{target}", "host": "127.0.0.1",
                          "healthcheck": "none"}})  # fmt: skip
    ids = {"route": "one", "listen": f"tcp://127.0.0.1:{listen}"}
    for _ in range(5):
        assert not served(listen, b"x")
    wait_for(lambda: lp.metric("labelproxy_upstream_dial_errors_total", **ids) == 10,
             what="each client dialled twice (the retry)")  # fmt: skip
    assert lp.metric("labelproxy_backend_ejections_total", **ids) == 0
    assert ready(lp, "one") == {f"127.0.0.1:{target}"}
    assert "the route's last ready backend stays in" in lp.log()
    with echoes(target):
        assert served(listen, b"at once")


def test_one_backend_that_comes_back_within_the_retry_delay_serves_the_client(
    process: Any,
) -> None:
    """The client's one retry: its backend refuses the first dial and listens right after."""
    listen, target = free_port(), free_port()
    lp = process({"one": {**ROUTE, "port": f"{listen}:{target}", "host": "127.0.0.1",
                          "healthcheck": "none", "connect_timeout": "5s"}})  # fmt: skip
    ids = {"route": "one", "listen": f"tcp://127.0.0.1:{listen}"}
    backend = socket.socket()
    backend.bind(("127.0.0.1", target))  # bound, not listening: a dial is refused
    with backend, socket.create_connection(("127.0.0.1", listen), timeout=10.0) as client:
        client.sendall(b"retry me")
        wait_for(lambda: lp.metric("labelproxy_upstream_dial_errors_total", **ids) == 1,
                 timeout=5, what="the first dial refused")  # fmt: skip
        backend.listen(1)  # before the retry (dial.RETRY_DELAY later)
        backend.settimeout(5.0)
        upstream, _ = backend.accept()
        with upstream:
            assert upstream.recv(100) == b"retry me"
            upstream.sendall(b"served")
            upstream.shutdown(socket.SHUT_WR)
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"served"
    assert lp.metric("labelproxy_upstream_dial_errors_total", **ids) == 1


# -- a real container -----------------------------------------------------------------------


@pytest.fixture
def lp_docker(dockerd: Any) -> Iterator[LabelproxyProcess]:
    with labelproxy({"LABELPROXY_DOCKER_HOST": dockerd.host}) as proc:
        yield proc


@pytest.mark.docker
def test_a_container_that_listens_two_seconds_after_it_starts_resets_no_client(
    lp_docker: LabelproxyProcess, dockerd: Any, busybox_image: str
) -> None:
    listen, target = free_port(), free_port()
    container = dockerd.client().containers.run(
        busybox_image,
        ["sh", "-c", f"sleep 2; exec nc -ll -p {target} -e cat"],
        detach=True, init=True, network_mode="host",
        labels={"proxy.slow.port": f"{listen}:{target}", "proxy.slow.bind": "127.0.0.1",
                "proxy.slow.healthcheck.interval": "0.2s"},
    )  # fmt: skip
    try:
        began = time.monotonic()
        # the listener opens as soon as the route exists, before the program listens
        client = wait_for(
            lambda: socket.create_connection(("127.0.0.1", listen), timeout=10.0),
            what="the route's listener",
        )
        with client:
            client.sendall(b"first client")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"first client"  # not reset: held, then served
        assert time.monotonic() - began >= 1.0  # it did wait for the program
        ids = {"route": "slow", "listen": f"tcp://127.0.0.1:{listen}"}
        assert lp_docker.metric("labelproxy_upstream_dial_errors_total", **ids) == 0
        assert not lp_docker.metric(
            "labelproxy_connections_rejected_total", **ids, reason="no_backend"
        )
        route = lp_docker.route("slow")
        assert route is not None and route["healthcheck"]["healthcheck"] == "tcp"
    finally:
        container.remove(force=True)



def test_a_held_client_is_served_by_a_backend_that_is_ready_as_it_appears(
    process: Any, tmp_path: Path
) -> None:
    """A backend with no active check is ready at once (no state change to hear of): a
    client held for the route is woken by the update that brings it."""
    listen, dead = free_port(), free_port()
    lp = process({"r": {**ROUTE, "port": f"{listen}:{dead}", "host": "127.0.0.1",
                        "connect_timeout": "20s", "healthcheck.interval": "0.1s"}})  # fmt: skip
    ids = {"route": "r", "listen": f"tcp://127.0.0.1:{listen}"}
    with echoes(free_port()) as [server], socket.create_connection(
        ("127.0.0.1", listen), timeout=20.0
    ) as client:
        client.sendall(b"waiting")
        wait_for(lambda: lp.metric("labelproxy_connections_active", **ids) == 1,
                 what="the client held")  # fmt: skip
        began = time.monotonic()
        write_routes(tmp_path / "routes.yaml", {"r": {
            **ROUTE, "port": str(listen), "host": f"127.0.0.1:{server.port}",
            "healthcheck": "none", "connect_timeout": "20s",
        }})  # fmt: skip
        client.shutdown(socket.SHUT_WR)
        try:
            got = recv_all(client)
        except OSError as exc:
            got = repr(exc).encode()
        assert got == b"waiting", lp.log()[-3000:]
        assert time.monotonic() - began < 10  # woken, not at the end of its 20 s
