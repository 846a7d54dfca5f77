"""A route's `state` on /routes from its desired spec, its live listener's spec and its bind
problem: `up` while a listener on its key can serve it without a re-bind (new backends, a
sleep or a wake, new options are swapped in place), `pending` while the listener it needs is
not bound yet, `error` with a bind problem."""

from __future__ import annotations

import dataclasses

import pytest

from labelproxy.spec import Backend, ListenKey, Problem, RouteOptions, RouteSpec, Sleep
from labelproxy.status import RoutesSnapshot

SLEEP = Sleep(container_id="c0ffee", container_name="app", idle_timeout=60.0)
AWAKE = RouteSpec(
    alias="app",
    scheme="tcp4",
    key=ListenKey("tcp", "0.0.0.0", 8080),
    backends=(Backend("10.0.0.2", 80, "c0ffee", "app"),),
    options=RouteOptions(sleep=SLEEP),
)
ASLEEP = dataclasses.replace(
    AWAKE, backends=(), options=RouteOptions(sleep=dataclasses.replace(SLEEP, asleep=True))
)
CAPPED = dataclasses.replace(AWAKE, options=RouteOptions(sleep=SLEEP, max_connections=5))
DUAL = dataclasses.replace(AWAKE, scheme="tcp")  # another family: the socket is made again
BIND = Problem("bind", "app", "app", "port", "8080", "cannot listen on tcp://0.0.0.0:8080")


def state(desired: RouteSpec, live: RouteSpec | None, error: Problem | None = None) -> str:
    bound = (("0.0.0.0", 8080),) if live else ()
    snapshot = RoutesSnapshot(
        ready=True, docker_enabled=True, docker_connected=True, containers=1,
        routes=((desired, live, bound, error, (0,) * 6, {}, {}, None),), problems=(),
    )  # fmt: skip
    return str(snapshot.document()["routes"][0]["state"])


@pytest.mark.parametrize(
    ("desired", "live", "error", "expected"),
    [
        pytest.param(AWAKE, AWAKE, None, "up", id="applied"),
        pytest.param(ASLEEP, AWAKE, None, "up", id="asleep: swapped in place"),
        pytest.param(AWAKE, ASLEEP, None, "up", id="awake again: swapped in place"),
        pytest.param(CAPPED, AWAKE, None, "up", id="an option: swapped in place"),
        pytest.param(AWAKE, None, None, "pending", id="not bound yet"),
        pytest.param(DUAL, AWAKE, None, "pending", id="a changed bind"),
        pytest.param(AWAKE, None, BIND, "error", id="the bind failed"),
    ],
)
def test_route_state(
    desired: RouteSpec, live: RouteSpec | None, error: Problem | None, expected: str
) -> None:
    assert state(desired, live, error) == expected
