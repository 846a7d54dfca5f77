"""What checks cost for port ranges and loops, against real loopback servers: a 5,000-port
range is checked once per backend per interval (on its first port, every port following),
and a backend that is labelproxy's own listener is never dialled by a check."""

from __future__ import annotations

import logging

import anyio
import pytest

from labelproxy.health.checker import HealthChecker
from labelproxy.health.targets import health_targets
from labelproxy.health.views import HealthTarget, StateChange
from labelproxy.healthcheck import HealthCheck
from labelproxy.spec import Backend, ListenKey, RouteOptions, RouteSpec
from tests.dataplane.test_health_checker import CountingServer, listening, running
from tests.support.lp import consecutive_free_ports

pytestmark = pytest.mark.anyio

CHECK = HealthCheck("tcp", interval=0.2, timeout=0.5, rise=1, fall=1)


async def test_a_5000_port_range_costs_one_check_per_interval_on_its_first_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="labelproxy.health.checker")
    target = consecutive_free_ports(1)  # below the ephemeral range: target + 4,999 fits
    routes: dict[ListenKey, RouteSpec] = {}
    for i in range(5000):  # proxy.x.port: 30000-34999:TARGET-(TARGET+4999)
        key = ListenKey("tcp", "0.0.0.0", 30000 + i)
        routes[key] = RouteSpec("x", "tcp", key, (Backend("127.0.0.1", target + i, "c", "c"),),
                                RouteOptions(healthcheck=CHECK), source="c")
    first, last = ListenKey("tcp", "0.0.0.0", 30000), ListenKey("tcp", "0.0.0.0", 34999)
    checker, server = HealthChecker(), CountingServer()
    down = anyio.Event()

    def on_change(change: StateChange) -> None:
        if change.key == last and not change.ready:
            down.set()

    checker.subscribe(on_change)
    async with running(checker):
        async with listening(server, target):  # only the first port's target listens
            checker.set_targets(health_targets(routes))
            assert await checker.wait_ready(last, timeout=5.0) == routes[last].backends
            assert all(checker.ready_backends(key) for key in routes)  # all through one
            before = server.total
            await anyio.sleep(1.0)  # a window to count checks in: a rate, not a wait
            checks = server.total - before
        with anyio.fail_after(5.0):  # the first port's target stops: the range follows
            await down.wait()
        assert not any(checker.ready_backends(key) for key in routes)
    assert 3 <= checks <= 8, checks  # one per 0.2 s interval (jittered), not 5,000
    head, tail = checker.status(first), checker.status(last)
    assert head is not None and tail is not None
    assert head.results["pass"] >= checks
    assert tail.results == {}  # not checked: no health_checks_total series for its port
    assert tail.backends[0].last_error == f"Connection refused (checked on 127.0.0.1:{target})"
    assert tail.backends[0].last_result == "fail" and tail.backends[0].phase == "down"
    # a line per change of the checked port, and one for the 4,999 others, each way
    lines = [r for r in caplog.records if r.getMessage().startswith("backend")]
    assert len(lines) == 4, [(r.getMessage(), r.__dict__.get("listen")) for r in lines]
    assert lines[1].__dict__["listen"] == "tcp://0.0.0.0:30001-34999"


async def test_a_check_never_dials_labelproxys_own_listener() -> None:
    """The relay refuses to dial its own listeners (a loop); a check must not dial them
    either: it fails at once, saying so, and the listener sees no connection."""
    server = CountingServer()
    async with listening(server) as port:
        key = ListenKey("tcp", "127.0.0.1", port)
        checker = HealthChecker()

        def own(transport: str, host: str, at: int) -> ListenKey | None:
            return key if (transport, host, at) == ("tcp", "127.0.0.1", port) else None

        checker.own = own
        # a name that resolves to that listener: the desired state cannot see this loop
        backend = Backend("localhost", port)
        async with running(checker):
            checker.set_targets({key: HealthTarget(CHECK, (backend,), route="loopy")})
            with anyio.fail_after(5.0):
                while (health := checker.status(key)) is None or \
                        sum(health.results.values()) < 3:  # fmt: skip
                    await anyio.sleep(0.05)
    assert server.total == 0  # no check went round the loop
    status = health.backends[0]
    assert not status.ready and health.results["fail"] >= 3
    assert status.last_error.startswith(f"loop: localhost:{port} is labelproxy's own listener")
