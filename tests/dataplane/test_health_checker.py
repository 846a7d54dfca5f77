"""The HealthChecker against real loopback servers: readiness after `rise`, leaving within
`fall x interval`, passive ejection and the last-ready rule, the concurrency cap, one check in
flight per backend, and no check traffic for routes whose checks are off."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import pytest

from labelproxy.health.checker import HealthChecker
from labelproxy.health.state import PassivePolicy
from labelproxy.health.views import HealthTarget, StateChange
from labelproxy.healthcheck import HealthCheck
from labelproxy.spec import Backend, ListenKey
from labelproxy.streams.tcp import loop as data_loop
from tests.support.lp import free_port

pytestmark = pytest.mark.anyio

KEY = ListenKey("tcp", "0.0.0.0", 7000)
OTHER = ListenKey("tcp", "0.0.0.0", 7001)
FAST = HealthCheck("tcp", interval=0.1, timeout=0.1, rise=2, fall=3)


@dataclass
class CountingServer:
    """A TCP server that counts connections (in total and at once); each is held `hold`
    seconds, then answered with `reply` and closed."""

    hold: float = 0.0
    reply: bytes = b""
    active: int = 0
    max_active: int = 0
    total: int = 0
    reached: dict[int, anyio.Event] = field(default_factory=dict)

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.active += 1
        self.total += 1
        self.max_active = max(self.max_active, self.active)
        for count, event in self.reached.items():
            if self.total >= count:
                event.set()
        try:
            async with stream:
                await anyio.sleep(self.hold)
                if self.reply:
                    await stream.send(self.reply)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            self.active -= 1

    async def wait_total(self, count: int, *, timeout: float) -> None:
        event = self.reached.setdefault(count, anyio.Event())
        if self.total >= count:
            return
        with anyio.fail_after(timeout):
            await event.wait()


@asynccontextmanager
async def listening(server: CountingServer, port: int = 0) -> AsyncIterator[int]:
    """`server` on 127.0.0.1:`port` (0: any) until the block ends. Its own accept loop:
    asyncio's `sock_accept` (under anyio's `serve`) on Python 3.11 raises InvalidStateError
    from its callback when a connection (a check's) arrives in the loop turn that cancels it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)

    async def accept(tg: anyio.abc.TaskGroup) -> None:
        while True:
            await anyio.wait_readable(sock)
            try:
                conn, _ = sock.accept()
            except OSError:  # gone from the queue already (the client reset it)
                continue
            conn.setblocking(False)
            try:
                stream = await anyio.abc.SocketStream.from_socket(conn)
            except OSError:
                conn.close()
                continue
            tg.start_soon(server.handle, stream)

    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept, tg)
            yield int(sock.getsockname()[1])
            tg.cancel_scope.cancel()


@asynccontextmanager
async def running(checker: HealthChecker) -> AsyncIterator[HealthChecker]:
    async with anyio.create_task_group() as tg:
        await tg.start(checker.serve)
        yield checker
        tg.cancel_scope.cancel()


class Changes:
    """Records every StateChange; `wait` for the next one matching, with a deadline. Ready
    changes come on the event loop; ejections may come from another thread (only recorded)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, StateChange]] = []
        self._event = anyio.Event()

    def __call__(self, change: StateChange) -> None:
        self.seen.append((time.monotonic(), change))
        if change.ready:
            self._event.set()
            self._event = anyio.Event()

    async def ready(self, backend: Backend, *, timeout: float) -> float:
        """Wait until `backend` is reported ready; the time it was."""
        with anyio.fail_after(timeout):
            while True:
                for when, change in reversed(self.seen):
                    if change.backend == backend:
                        if change.ready:
                            return when
                        break
                await self._event.wait()


async def test_a_backend_listening_2s_late_becomes_ready_after_rise_passes() -> None:
    port = free_port()
    backend = Backend("127.0.0.1", port, "c1", "late")
    checker, changes, server = HealthChecker(), Changes(), CountingServer()
    checker.subscribe(changes)
    async with running(checker):
        checker.set_targets({KEY: HealthTarget(FAST, (backend,), route="late")})
        assert checker.ready_backends(KEY) == ()
        await anyio.sleep(2.0)  # the program in the container starts listening 2 s late
        assert checker.ready_backends(KEY) == ()
        async with listening(server, port):
            since = time.monotonic()
            assert await checker.wait_ready(KEY, timeout=5.0) == (backend,)
            took = time.monotonic() - since
            await server.wait_total(FAST.rise, timeout=2.0)  # it saw the `rise` checks
    assert took < FAST.rise * FAST.interval * 1.1 + 0.5
    assert [c.ready for _, c in changes.seen] == [True]
    health = checker.status(KEY)
    assert health is not None
    assert health.results["fail"] >= 10  # refused about every 0.1 s for 2 s
    assert health.backends[0].phase == "up"
    assert health.backends[0].last_error == "Connection refused"


async def test_a_backend_that_stops_listening_leaves_within_fall_intervals_and_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="labelproxy.health.checker")
    check = HealthCheck("tcp", interval=0.2, timeout=0.2, rise=2, fall=3)
    steady, flaky = CountingServer(), CountingServer()
    checker, changes = HealthChecker(starting_interval=0.1), Changes()
    checker.subscribe(changes)
    async with running(checker), listening(steady) as steady_port:
        a = Backend("127.0.0.1", steady_port, "a", "steady")
        async with listening(flaky) as flaky_port:
            b = Backend("127.0.0.1", flaky_port, "b", "flaky")
            checker.set_targets({KEY: HealthTarget(check, (a, b), route="svc")})
            await changes.ready(a, timeout=5.0)
            await changes.ready(b, timeout=5.0)
            stopped = time.monotonic()
        with anyio.fail_after(5.0):
            while checker.is_ready(KEY, b):
                await anyio.sleep(0.02)
        left = time.monotonic() - stopped
        assert checker.ready_backends(KEY) == (a,)
        async with listening(flaky, flaky_port):
            relistened = time.monotonic()
            back = await changes.ready(b, timeout=5.0) - relistened
        assert checker.ready_backends(KEY) == (a, b)
    assert 0.3 < left < check.fall * check.interval * 1.1 + check.timeout + 0.5
    assert back < check.rise * check.interval * 1.1 + check.timeout + 0.5
    # one log line per state change, not per check
    seen = [(c.backend.container_name, c.ready) for _, c in changes.seen]
    assert sorted(seen[:2]) == [("flaky", True), ("steady", True)]
    assert seen[2:] == [("flaky", False), ("flaky", True)]
    lines = [(r.getMessage(), r.__dict__["container"]) for r in caplog.records]
    assert sorted(lines) == sorted(
        [("backend ready", "steady"), ("backend ready", "flaky"),
         ("backend not ready", "flaky"), ("backend ready", "flaky")]
    )  # fmt: skip
    health = checker.status(KEY)
    assert health is not None
    assert sum(health.results.values()) > 12


async def test_passive_ejection_with_checks_off_grows_its_back_off() -> None:
    backends = tuple(Backend("127.0.0.1", free_port(), f"c{i}", f"r{i}") for i in range(3))
    first = backends[0]
    policy = PassivePolicy(failures=3, base_ejection=0.3, max_ejection=5.0)
    checker, changes = HealthChecker(passive=policy), Changes()
    checker.subscribe(changes)

    def fail_dials() -> list[bool]:  # from another thread, as the TCP data loop does
        return [checker.report_dial_failure(KEY, first, why="Connection refused") for _ in "123"]

    async with running(checker):
        checker.set_targets({KEY: HealthTarget(HealthCheck("none"), backends, route="rep")})
        assert checker.ready_backends(KEY) == backends
        durations = []
        for _ in range(2):
            assert await anyio.to_thread.run_sync(fail_dials) == [False, False, True]
            ejected = time.monotonic()
            assert checker.ready_backends(KEY) == backends[1:]
            durations.append(await changes.ready(first, timeout=5.0) - ejected)
            assert checker.ready_backends(KEY) == backends
    # measured from after the worker thread returned, so a hair short of the back-off
    assert 0.28 <= durations[0] < 0.3 + 0.4
    assert 0.58 <= durations[1] < 0.6 + 0.4
    health = checker.status(KEY)
    assert health is not None
    assert health.ejections == 2
    assert health.results == {"pass": 0, "fail": 0, "timeout": 0}  # no check ran


async def test_the_last_ready_backend_is_never_ejected(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="labelproxy.health.checker")
    only = Backend("127.0.0.1", free_port(), "only", "only")
    a, b = (Backend("127.0.0.1", free_port(), n, n) for n in "ab")
    checker = HealthChecker(passive=PassivePolicy(base_ejection=30.0))
    async with running(checker):
        checker.set_targets({
            KEY: HealthTarget(HealthCheck("none"), (only,), route="single"),
            OTHER: HealthTarget(HealthCheck("none"), (a, b), route="pair"),
        })  # fmt: skip
        ejected = [checker.report_dial_failure(KEY, only, why="refused") for _ in range(10)]
        assert not any(ejected)
        assert checker.ready_backends(KEY) == (only,)
        assert [checker.report_dial_failure(OTHER, a, why="refused") for _ in "123"][-1]
        assert checker.ready_backends(OTHER) == (b,)
        assert not any(checker.report_dial_failure(OTHER, b, why="refused") for _ in range(10))
        assert checker.ready_backends(OTHER) == (b,)
    spared = [r for r in caplog.records if "last ready backend stays in" in r.getMessage()]
    assert [r.__dict__["container"] for r in spared] == ["only", "b"]  # once per streak


async def test_an_ejected_checked_backend_returns_on_its_next_pass() -> None:
    server = CountingServer()
    check = HealthCheck("tcp", interval=1.0, timeout=0.5, rise=1, fall=3)
    policy = PassivePolicy(failures=3, base_ejection=0.2)
    checker, changes = HealthChecker(passive=policy, starting_interval=0.1), Changes()
    checker.subscribe(changes)
    async with running(checker), listening(server) as port:
        backend = Backend("127.0.0.1", port, "x", "x")
        spare = Backend("127.0.0.1", port, "y", "y")
        checker.set_targets({KEY: HealthTarget(check, (backend, spare), route="r")})
        await changes.ready(backend, timeout=5.0)
        await changes.ready(spare, timeout=5.0)
        for _ in "123":
            checker.report_dial_failure(KEY, backend, why="reset")
        ejected = time.monotonic()
        assert checker.ready_backends(KEY) == (spare,)
        back = await changes.ready(backend, timeout=5.0) - ejected
    # the check runs when the back-off ends, not an interval (1 s) later
    assert 0.2 <= back < 0.2 + 0.5
    assert changes.seen[-1][1].reason.startswith("ejection over and check passed")


async def test_the_concurrency_cap_bounds_checks_in_flight() -> None:
    server = CountingServer(hold=0.3, reply=b"OK\n")
    check = HealthCheck("send_expect", expect=b"OK", interval=0.1, timeout=2.0)
    checker = HealthChecker(max_concurrent=3)
    async with running(checker), listening(server) as port:
        backends = tuple(Backend("127.0.0.1", port, f"c{i}", f"c{i}") for i in range(12))
        checker.set_targets({KEY: HealthTarget(check, backends, route="many")})
        await server.wait_total(24, timeout=10.0)
        await checker.wait_ready(KEY, timeout=5.0)
    assert server.max_active == 3


async def test_one_check_in_flight_per_backend() -> None:
    server = CountingServer(hold=0.5, reply=b"OK\n")
    check = HealthCheck("send_expect", expect=b"OK", interval=0.1, timeout=2.0, rise=1)
    checker = HealthChecker()
    async with running(checker), listening(server) as port:
        checker.set_targets({KEY: HealthTarget(check, (Backend("127.0.0.1", port),))})
        await server.wait_total(3, timeout=5.0)
    assert server.max_active == 1


async def test_no_check_traffic_for_routes_with_checks_off_or_removed() -> None:
    quiet, checked = CountingServer(), CountingServer()
    checker = HealthChecker()
    async with running(checker), listening(quiet) as quiet_port, listening(checked) as port:
        off = {
            OTHER: HealthTarget(HealthCheck("none"), (Backend("127.0.0.1", quiet_port),)),
            ListenKey("tcp", "0.0.0.0", 7002): HealthTarget(
                HealthCheck("docker"), (Backend("127.0.0.1", quiet_port),)
            ),
        }
        checker.set_targets({**off, KEY: HealthTarget(FAST, (Backend("127.0.0.1", port),))})
        await checker.wait_ready(KEY, timeout=5.0)
        await checked.wait_total(5, timeout=5.0)
        checker.set_targets(off)
        assert not checker.tracks(KEY)
        await anyio.sleep(0.2)  # let a check that was in flight at removal finish
        after_removal = checked.total
        await anyio.sleep(0.6)  # six intervals in which a forgotten check would have run
        assert checked.total == after_removal
        assert checker.ready_backends(OTHER) == off[OTHER].backends
    assert quiet.total == 0


async def test_set_targets_is_idempotent_and_keeps_state_across_timing_changes() -> None:
    server = CountingServer()
    checker, changes = HealthChecker(), Changes()
    checker.subscribe(changes)
    async with running(checker), listening(server) as port:
        backend = Backend("127.0.0.1", port)
        targets = {KEY: HealthTarget(FAST, (backend,), route="r")}
        checker.set_targets(targets)
        await checker.wait_ready(KEY, timeout=5.0)
        checker.set_targets(targets)
        checker.set_targets({KEY: HealthTarget(FAST, (backend,), route="r")})
        slower = HealthCheck("tcp", interval=0.3, timeout=0.2, rise=3, fall=2)
        checker.set_targets({KEY: HealthTarget(slower, (backend,), route="r")})
        assert checker.ready_backends(KEY) == (backend,)
        total = server.total
        await server.wait_total(total + 2, timeout=5.0)
        assert checker.ready_backends(KEY) == (backend,)
        # a different probe the server cannot satisfy: down after `fall` failures
        wrong = HealthCheck("send_expect", expect=b"never", interval=0.1, timeout=0.1, fall=2)
        checker.set_targets({KEY: HealthTarget(wrong, (backend,), route="r")})
        with anyio.fail_after(5.0):
            while checker.is_ready(KEY, backend):
                await anyio.sleep(0.02)
    assert [c.ready for _, c in changes.seen] == [True, False]


async def test_reports_for_unknown_routes_or_backends_are_ignored() -> None:
    checker = HealthChecker()
    stranger = Backend("127.0.0.1", 9)
    assert not checker.report_dial_failure(KEY, stranger)
    checker.report_dial_success(KEY, stranger)
    assert checker.ready_backends(KEY) == ()
    assert checker.status(KEY) is None
    with contextlib.suppress(TimeoutError):
        assert await checker.wait_ready(KEY, timeout=0.05) == ()


async def test_a_backend_removed_before_its_first_check_ran_disturbs_nothing() -> None:
    server = CountingServer()
    checker = HealthChecker()
    async with running(checker), listening(server) as port:
        gone, kept = Backend("127.0.0.1", port, "gone"), Backend("127.0.0.1", port, "kept")
        checker.set_targets({KEY: HealthTarget(FAST, (gone,))})
        checker.set_targets({KEY: HealthTarget(FAST, (kept,))})  # before any task ran
        assert await checker.wait_ready(KEY, timeout=5.0) == (kept,)


async def test_default_checks_run_on_the_tcp_data_loop() -> None:
    """Given the TCP data loop (as the runtime gives it), the default checks run there: no
    hand-over of the interpreter lock between the relay's thread and the event loop for a
    check. A backend listening late is waited for across the threads (`wait_ready` on the
    event loop), leaves after `fall` refused checks and comes back after `rise`."""
    check = HealthCheck("tcp", interval=0.1, timeout=0.2, rise=2, fall=2)
    port = free_port()
    backend = Backend("127.0.0.1", port, "c1", "late")
    checker = HealthChecker(check_loop=data_loop.shared, starting_interval=0.1)
    seen: list[tuple[str, bool]] = []  # (thread, ready) of each change, from any thread
    checker.subscribe(lambda change: seen.append((threading.current_thread().name, change.ready)))
    server = CountingServer()
    async with running(checker):
        checker.set_targets({KEY: HealthTarget(check, (backend,), route="late")})
        assert await checker.wait_ready(KEY, timeout=0.3) == ()  # nothing listens yet
        async with listening(server, port):
            assert await checker.wait_ready(KEY, timeout=5.0) == (backend,)
        with anyio.fail_after(5.0):
            while checker.is_ready(KEY, backend):
                await anyio.sleep(0.02)
        async with listening(server, port):
            assert await checker.wait_ready(KEY, timeout=5.0) == (backend,)
    assert seen == [("labelproxy-tcp", True), ("labelproxy-tcp", False),
                    ("labelproxy-tcp", True)]
    health = checker.status(KEY)
    assert health is not None and health.results["pass"] >= 4 and health.results["fail"] >= 2


def _connecting_towards(port: int) -> int:
    """This host's TCP sockets still connecting (SYN_SENT, state 02) to 127.0.0.1:`port`."""
    count = 0
    with open("/proc/net/tcp") as lines:
        next(lines)
        for line in lines:
            fields = line.split()
            count += int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "02"
    return count


@contextlib.contextmanager
def jammed_listener() -> Iterator[int]:
    """A loopback port whose accept queue is full (it never accepts): connects to it hang
    in SYN_SENT until their timeout."""
    with socket.socket() as jammed:
        jammed.bind(("127.0.0.1", 0))
        jammed.listen(0)
        port = int(jammed.getsockname()[1])
        with socket.socket() as filler:  # fills the accept queue: later SYNs are dropped
            filler.connect(("127.0.0.1", port))
            yield port


@pytest.mark.parametrize("on_data_loop", [False, True], ids=["asyncio", "data_loop"])
async def test_the_cap_bounds_all_checks_in_flight_together(on_data_loop: bool) -> None:
    """12 backends with the default check and 12 with `send_expect`, behind two jammed
    listeners: their connects hang until the check's timeout, and no more than
    `max_concurrent` checks of both kinds together are ever in flight (the default ones on
    the check loop, the others on the event loop, one cap); the others wait for a slot."""
    with jammed_listener() as port, jammed_listener() as other_port:
        check = HealthCheck("tcp", interval=0.2, timeout=0.5, rise=1, fall=1)
        talk = HealthCheck("send_expect", send=b"PING\r\n", expect=b"PONG", interval=0.2,
                           timeout=0.5, rise=1, fall=1)
        checker = HealthChecker(max_concurrent=3,
                                check_loop=data_loop.shared if on_data_loop else None)
        most = 0
        async with running(checker):
            checker.set_targets({
                KEY: HealthTarget(check, tuple(Backend("127.0.0.1", port, f"c{i}", f"c{i}")
                                               for i in range(12)), route="jammed"),
                OTHER: HealthTarget(talk, tuple(Backend("127.0.0.1", other_port, f"d{i}",
                                                        f"d{i}") for i in range(12)),
                                    route="talk"),
            })  # fmt: skip
            with anyio.move_on_after(2.0):  # four timeouts' worth of samples
                while True:
                    most = max(most, _connecting_towards(port) + _connecting_towards(other_port))
                    await anyio.sleep(0.01)
            default, other = checker.status(KEY), checker.status(OTHER)
    assert most == 3
    assert default is not None and default.results["timeout"] >= 1  # both kinds ran
    assert other is not None and other.results["timeout"] >= 1


@pytest.mark.parametrize("on_data_loop", [False, True], ids=["asyncio", "data_loop"])
async def test_checks_waiting_for_a_slot_start_as_soon_as_one_is_free(on_data_loop: bool) -> None:
    """40 new backends, 4 slots, a 5 s interval: each landing check hands its slot on at once,
    so all 40 are checked and ready within their first second, not 4 per interval."""
    check = HealthCheck("tcp", interval=5.0, timeout=1.0, rise=1, fall=1)
    checker = HealthChecker(max_concurrent=4, starting_interval=5.0,
                            check_loop=data_loop.shared if on_data_loop else None)
    server = CountingServer()
    async with running(checker), listening(server) as port:
        keys = [ListenKey("tcp", "0.0.0.0", 7100 + i) for i in range(40)]
        checker.set_targets({key: HealthTarget(check, (Backend("127.0.0.1", port, "c", "c"),),
                                               route=f"r{i}") for i, key in enumerate(keys)})
        with anyio.fail_after(3.0):  # the first checks are spread over 0.5 s (jitter x 5 s)
            for key in keys:
                await checker.wait_ready(key, timeout=3.0)
        assert all(checker.ready_backends(key) for key in keys)
