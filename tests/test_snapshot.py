"""Table tests for merging containers and static routes into one DesiredState (snapshot.py)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest

from labelproxy.containers import ContainerView, DiscoveryContext, Health
from labelproxy.snapshot import build_desired
from labelproxy.spec import Backend, DesiredState, ListenKey, Problem, RouteSpec

CTX = DiscoveryContext()
KEY = ListenKey("tcp", "::", 2222)


def box(
    name: str,
    created: float,
    labels: Mapping[str, str],
    *,
    ip: str,
    service: str = "",
    health: Health = "none",
) -> ContainerView:
    return ContainerView(
        id=f"id-{name}",
        name=name,
        created=created,
        labels=labels,
        health=health,
        networks={"app": ip},
        service=service,
    )


SSH = {"proxy.ssh.port": "2222:22"}
GIT = {"proxy.git.port": "2222:22"}
WEB1 = box("web-1", 10, SSH, ip="10.0.0.1", service="compose:shop/web")
WEB2 = box("web-2", 20, SSH, ip="10.0.0.2", service="compose:shop/web")
WEB3 = box("web-3", 30, SSH, ip="10.0.0.3", service="compose:shop/web")


def backends(state: DesiredState, key: ListenKey = KEY) -> list[str]:
    return [b.container_name for b in state.routes[key].backends]


@pytest.mark.parametrize(
    ("views", "pool", "problem_sources"),
    [
        # replicas of one compose service share one listener
        ([WEB1, WEB2, WEB3], ["web-1", "web-2", "web-3"], []),
        # plain containers without a service, same alias: replicas too
        ([box("a", 1, SSH, ip="10.0.0.1"), box("b", 2, SSH, ip="10.0.0.2")], ["a", "b"], []),
        # unhealthy / starting replicas are left out of the pool, healthy ones stay
        ([WEB1, box("web-2", 20, SSH, ip="10.0.0.2", service="compose:shop/web",
                    health="unhealthy"),
          box("web-3", 30, SSH, ip="10.0.0.3", service="compose:shop/web", health="healthy")],
         ["web-1", "web-3"], []),
        # the holder itself unhealthy: the route stays, with an empty pool
        ([box("web-1", 10, SSH, ip="10.0.0.1", health="starting")], [], []),
        # another service on the key: conflict, the oldest keeps it
        ([box("api-1", 5, SSH, ip="10.0.0.9", service="compose:shop/api"), WEB1],
         ["api-1"], ["web-1"]),
        # another alias on the key: conflict, the oldest keeps it
        ([box("gitea", 50, GIT, ip="10.0.0.8"), WEB1], ["web-1"], ["gitea"]),
        # same created time: the smaller id wins
        ([box("b", 7, GIT, ip="10.0.0.8"), box("a", 7, SSH, ip="10.0.0.7")], ["a"], ["b"]),
    ],
)  # fmt: skip
def test_pools_and_conflicts(
    views: list[ContainerView], pool: list[str], problem_sources: list[str]
) -> None:
    state = build_desired(views, CTX)
    assert list(state.routes) == [KEY]
    assert backends(state) == pool
    assert [p.source for p in state.problems] == problem_sources
    for problem in state.problems:
        assert problem.kind == "conflict"


def test_conflict_names_the_holder_and_the_label() -> None:
    state = build_desired([box("gitea", 50, GIT, ip="10.0.0.8"), WEB1], CTX)
    [problem] = state.problems
    assert problem.route == "git"
    assert problem.label == "proxy.git.port"
    assert problem.value == "2222:22"
    text = str(problem)
    assert "gitea" in text
    assert "route 'ssh' of container web-1" in text
    assert "tcp://[::]:2222" in text


def test_conflicts_of_a_range_are_reported_once() -> None:
    holder = box("old", 1, {"proxy.a.port": "3000-3009"}, ip="10.0.0.1")
    late = box("new", 2, {"proxy.b.port": "3005-3014"}, ip="10.0.0.2")
    state = build_desired([late, holder], CTX)
    assert len(state.routes) == 15
    assert {s.alias for k, s in state.routes.items() if k.port >= 3010} == {"b"}
    [problem] = state.problems
    assert "(5)" in problem.message
    assert problem.source == "new"


def test_a_bad_label_on_one_container_leaves_the_others_alone() -> None:
    bad = box("bad", 1, {"proxy.x.port": "nope", "proxy.y.port": "3001"}, ip="10.0.0.5")
    state = build_desired([bad, WEB1], CTX)
    assert sorted(k.port for k in state.routes) == [2222, 3001]
    [problem] = state.problems
    assert (problem.kind, problem.source, problem.label) == ("label", "bad", "proxy.x.port")


def test_replicas_that_disagree_use_the_oldest_settings_and_say_so() -> None:
    newer = box("web-2", 20, {**SSH, "proxy.ssh.max_connections": "5"}, ip="10.0.0.2",
                service="compose:shop/web")  # fmt: skip
    state = build_desired([newer, WEB1], CTX)
    route = state.routes[KEY]
    assert route.options.max_connections is None
    assert [b.container_name for b in route.backends] == ["web-1", "web-2"]
    [problem] = state.problems
    assert problem.kind == "conflict"
    assert problem.source == "web-2"
    assert "web-1" in problem.message


def test_static_routes_hold_their_keys() -> None:
    static = RouteSpec(
        alias="bastion",
        scheme="tcp",
        key=KEY,
        backends=(Backend("10.1.1.1", 22),),
        source="/etc/labelproxy/routes.yml",
    )
    state = build_desired([WEB1], CTX, static=[static])
    assert state.routes == {KEY: static}
    [problem] = state.problems
    assert problem.kind == "conflict"
    assert problem.source == "web-1"
    assert "routes file /etc/labelproxy/routes.yml" in problem.message
    assert "'bastion'" in problem.message


def test_two_static_routes_on_one_key_conflict() -> None:
    first = RouteSpec("a", "tcp", KEY, (Backend("10.1.1.1", 22),), source="r.yml")
    second = RouteSpec("b", "tcp", KEY, (Backend("10.1.1.2", 22),), source="r.yml")
    state = build_desired([], CTX, static=[second, first])
    assert state.routes[KEY].alias == "a"
    [problem] = state.problems
    assert (problem.kind, problem.route, problem.source) == ("conflict", "b", "r.yml")


def test_static_problems_are_passed_through() -> None:
    bad = Problem("label", "x", "r.yml", "routes.x.port", "0", "expected a port")
    assert build_desired([], CTX, static_problems=[bad]) == DesiredState({}, (bad,))
    assert build_desired([], CTX) == DesiredState()


def test_replica_group_source_is_the_service() -> None:
    state = build_desired([WEB2, WEB1], CTX)
    assert state.routes[KEY].source == "compose:shop/web"
    plain = build_desired([box("solo", 1, SSH, ip="10.0.0.1")], CTX)
    assert plain.routes[KEY].source == "solo"


def test_output_does_not_depend_on_input_order() -> None:
    views = [
        WEB1,
        WEB2,
        box("web-3", 30, SSH, ip="10.0.0.3", service="compose:shop/web", health="unhealthy"),
        box("api-1", 5, SSH, ip="10.0.0.9", service="compose:shop/api"),
        box("gitea", 50, {**GIT, "proxy.git2.port": "3022:22"}, ip="10.0.0.8"),
        box("dns", 1, {"proxy.dns.port": "53", "proxy.dns.scheme": "udp"}, ip="10.0.0.53"),
        box("bad", 3, {"proxy.x.port": "80", "proxy.x.deny": "?"}, ip="10.0.0.4"),
    ]
    state, *others = [build_desired(order, CTX) for order in _orders(views)]
    assert len(others) > 10
    for other in others:
        assert other == state
        assert list(other.routes) == list(state.routes)
    assert list(state.routes) == sorted(state.routes)
    assert backends(state) == ["api-1"]


def _orders(views: list[ContainerView]) -> list[list[ContainerView]]:
    """A handful of permutations, including the reverse, so the test stays fast."""
    perms = itertools.islice(itertools.permutations(views), 0, None, 97)
    return [list(views), list(reversed(views)), *(list(p) for p in perms)]

