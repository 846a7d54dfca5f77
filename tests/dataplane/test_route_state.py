"""A route's `state` on /routes while a real reconciler carries a pass out on loopback
listeners: a sleep or a wake (backends and `Sleep.asleep` change, the listener is updated in
place) never shows `pending`, while a route not bound yet still does.

/routes is served by the event loop between the pass's steps (the plan on a worker thread,
the slices of updates and starts), so a snapshot is taken at every turn of the loop while the
pass runs, as a client polling /routes would see it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import anyio
import pytest

from labelproxy import status
from labelproxy.metrics import Metrics
from labelproxy.reconciler import Reconciler
from labelproxy.spec import (
    Backend,
    DesiredState,
    EdgePolicy,
    ListenKey,
    RouteOptions,
    RouteSpec,
    Sleep,
)
from tests.support.lp import consecutive_free_ports, free_port

pytestmark = pytest.mark.anyio

PORTS = 100  # more than a few slices of updates (reconciler.SLICE)
INPUTS = status.Inputs(ready=True, docker_enabled=True, docker_connected=True, containers=1,
                       udp_max_sessions=100)  # fmt: skip
SLEEP = Sleep(container_id="c0ffee", container_name="sleepy", idle_timeout=1.0)


def awake_spec(port: int, target: int) -> RouteSpec:
    return RouteSpec(
        alias="sleepy",
        scheme="tcp4",
        key=ListenKey("tcp", "127.0.0.1", port),
        backends=(Backend("127.0.0.1", target, "c0ffee", "sleepy"),),
        options=RouteOptions(sleep=SLEEP),
        source="sleepy",
    )


def asleep(spec: RouteSpec) -> RouteSpec:
    """The spec discovery builds once the container is stopped: no backend, `asleep`."""
    sleep = dataclasses.replace(SLEEP, asleep=True)
    return dataclasses.replace(
        spec, backends=(), options=dataclasses.replace(spec.options, sleep=sleep)
    )


Seen = list[Counter[tuple[str, str]]]


async def states_during(rec: Reconciler, metrics: Metrics, want: DesiredState) -> Seen:
    """Apply `want` while taking a /routes snapshot at every turn of the loop: per snapshot,
    how many routes showed each (alias, state)."""
    seen: list[Counter[tuple[str, str]]] = []
    done = anyio.Event()

    async def apply() -> None:
        await rec.apply(want)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(apply)
        while not done.is_set():
            doc = status.routes_snapshot(rec, INPUTS, metrics=metrics).document()
            seen.append(Counter((r["route"], r["state"]) for r in doc["routes"]))
            await anyio.sleep(0)
    return seen


async def test_a_sleep_or_a_wake_never_shows_pending_a_new_route_does() -> None:
    first, target = consecutive_free_ports(PORTS), free_port()
    metrics = Metrics()
    awake = [awake_spec(port, target) for port in range(first, first + PORTS)]
    async with anyio.create_task_group() as tg:
        rec = Reconciler(metrics=metrics, edge=EdgePolicy(drain_timeout=1.0), task_group=tg)
        await rec.apply(DesiredState(routes={s.key: s for s in awake}))
        try:
            # the container went to sleep; in the same pass a route appears
            new = dataclasses.replace(awake[0], alias="fresh", key=ListenKey(
                "tcp", "127.0.0.1", free_port()), options=RouteOptions())
            sleeping = {s.key: s for s in [*map(asleep, awake), new]}
            seen = await states_during(rec, metrics, DesiredState(routes=sleeping))
            assert len(seen) > 3  # /routes was answered during the pass
            assert not any(c[("sleepy", "pending")] for c in seen), seen
            assert any(c[("fresh", "pending")] for c in seen)  # not bound yet: pending
            # woken again
            seen = await states_during(
                rec, metrics, DesiredState(routes={s.key: s for s in [*awake, new]})
            )
            assert len(seen) > 1
            assert not any(c[("sleepy", "pending")] for c in seen), seen
            # and once the pass is over, each listener has the spec that was published
            assert all(rec.live[s.key].spec == s for s in [*awake, new])
            doc = status.routes_snapshot(rec, INPUTS, metrics=metrics).document()
            assert {r["state"] for r in doc["routes"]} == {"up"}
        finally:
            await rec.close_all(drain_timeout=0)
            tg.cancel_scope.cancel()
