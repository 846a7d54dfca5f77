"""Table tests for the pure `plan(desired, actual)`."""

from __future__ import annotations

import pytest

from labelproxy.reconciler import Plan, plan
from labelproxy.spec import Backend, ListenKey, RouteOptions, RouteSpec, Scheme, transport_of


def spec(
    alias: str,
    port: int,
    *,
    backend: str = "10.0.0.1",
    scheme: Scheme = "tcp",
    bind: str = "::",
    max_conn: int | None = None,
) -> RouteSpec:
    return RouteSpec(
        alias=alias,
        scheme=scheme,
        key=ListenKey(transport_of(scheme), bind, port),
        backends=(Backend(backend, 22),),
        options=RouteOptions(max_connections=max_conn),
    )


def as_map(*specs: RouteSpec) -> dict[ListenKey, RouteSpec]:
    return {s.key: s for s in specs}


A = spec("a", 2222)
B = spec("b", 2223)
A_NEW_BACKEND = spec("a", 2222, backend="10.0.0.2")
A_CAPPED = spec("a", 2222, max_conn=5)
A_V6ONLY = spec("a", 2222, scheme="tcp6")


@pytest.mark.parametrize(
    ("desired", "actual", "expected"),
    [
        pytest.param(as_map(), as_map(), Plan(), id="nothing"),
        pytest.param(as_map(A), as_map(), Plan(start=(A,)), id="new route starts"),
        pytest.param(as_map(), as_map(A), Plan(stop=(A.key,)), id="gone route stops"),
        pytest.param(as_map(A, B), as_map(A, B), Plan(), id="unchanged routes untouched"),
        pytest.param(
            as_map(A_NEW_BACKEND, B), as_map(A, B), Plan(update=(A_NEW_BACKEND,)),
            id="backend change updates in place",
        ),
        pytest.param(
            as_map(A_CAPPED), as_map(A), Plan(update=(A_CAPPED,)), id="option change in place"
        ),
        pytest.param(
            as_map(A_V6ONLY), as_map(A), Plan(stop=(A.key,), start=(A_V6ONLY,)),
            id="family change rebinds",
        ),
        pytest.param(
            as_map(B), as_map(A), Plan(stop=(A.key,), start=(B,)), id="swap stops before start"
        ),
    ],
)
def test_plan(
    desired: dict[ListenKey, RouteSpec], actual: dict[ListenKey, RouteSpec], expected: Plan
) -> None:
    assert plan(desired, actual) == expected


def test_plan_is_deterministic_and_sorted() -> None:
    specs = [spec(f"r{i}", 3000 + (i * 7919) % 500) for i in range(50)]
    forward = plan(as_map(*specs), {})
    backward = plan(as_map(*reversed(specs)), {})
    assert forward == backward
    assert [s.key for s in forward.start] == sorted(s.key for s in specs)
