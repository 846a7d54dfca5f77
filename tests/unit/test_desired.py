"""Table tests for merging containers and static routes into one DesiredState
(sources/desired.py)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest

from labelproxy.sources.containers import ContainerView, DiscoveryContext, Health
from labelproxy.sources.desired import build_desired
from labelproxy.spec import (
    Backend,
    DesiredState,
    ListenKey,
    Problem,
    RouteSpec,
    binds_overlap,
    family_of,
)
from labelproxy.streams.sockets import bind_socket, has_ipv6
from tests.support.ports import free_port

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
        # standalone containers (no service), same alias: not replicas, the oldest keeps it
        ([box("b", 2, SSH, ip="10.0.0.2"), box("a", 1, SSH, ip="10.0.0.1")], ["a"], ["b"]),
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


def test_standalone_containers_on_one_key_conflict_and_name_the_holder() -> None:
    db = box("db", 1, SSH, ip="10.0.0.1")
    debug = box("debug", 2, SSH, ip="10.0.0.2")
    state = build_desired([debug, db], CTX)
    assert backends(state) == ["db"]
    [problem] = state.problems
    assert (problem.kind, problem.route, problem.source) == ("conflict", "ssh", "debug")
    assert "route 'ssh' of container db" in problem.message


def test_a_service_replica_does_not_join_a_standalone_holder() -> None:
    solo = box("solo", 1, SSH, ip="10.0.0.1")
    state = build_desired([WEB1, solo], CTX)
    assert backends(state) == ["solo"]
    assert [(p.kind, p.source) for p in state.problems] == [("conflict", "web-1")]


# -- overlapping binds on one port --------------------------------------------------------
def bound(name: str, created: float, scheme: str, bind: str, port: int = 2222) -> ContainerView:
    labels = {f"proxy.{name}.port": f"{port}:22", f"proxy.{name}.scheme": scheme,
              f"proxy.{name}.bind": bind}  # fmt: skip
    return box(name, created, labels, ip=f"10.0.0.{int(created)}")


OVERLAPS = [
    # (first scheme, first bind, second scheme, second bind, overlap?)
    ("tcp", "::", "tcp4", "127.0.0.1", True),
    ("tcp4", "0.0.0.0", "tcp4", "127.0.0.1", True),
    ("tcp", "::", "tcp4", "0.0.0.0", True),  # dual-stack :: takes every IPv4 address
    ("tcp6", "::", "tcp6", "::1", True),
    ("tcp", "::", "tcp", "::1", True),
    ("tcp4", "127.0.0.1", "tcp4", "127.0.0.2", False),
    ("tcp6", "::", "tcp4", "0.0.0.0", False),  # IPv6-only :: leaves IPv4 alone
    ("tcp6", "::", "tcp4", "127.0.0.1", False),
    ("tcp4", "0.0.0.0", "tcp6", "::1", False),
    ("tcp4", "127.0.0.1", "tcp6", "::1", False),
]


@pytest.mark.parametrize(("scheme1", "bind1", "scheme2", "bind2", "overlap"), OVERLAPS)
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_overlapping_binds_are_a_conflict_the_older_route_keeps(
    transport: str, scheme1: str, bind1: str, scheme2: str, bind2: str, overlap: bool
) -> None:
    scheme1, scheme2 = (s.replace("tcp", transport) for s in (scheme1, scheme2))
    for first, second in [("older", "newer"), ("newer", "older")]:  # either bind may be first
        views = [bound(first, 1, scheme1, bind1), bound(second, 2, scheme2, bind2)]
        state = build_desired(views, CTX)
        if not overlap:
            assert len(state.routes) == 2
            assert state.problems == ()
            continue
        [route] = state.routes.values()
        assert route.alias == first
        [problem] = state.problems
        assert (problem.kind, problem.route, problem.source) == ("conflict", second, second)
        assert f"overlaps {route.key}" in problem.message
        assert f"container {first}" in problem.message


def test_different_transports_on_one_port_do_not_overlap() -> None:
    views = [bound("t", 1, "tcp", "::"), bound("u", 2, "udp4", "127.0.0.1")]
    state = build_desired(views, CTX)
    assert len(state.routes) == 2
    assert state.problems == ()


def test_the_overlap_rule_is_the_kernels(unused_tcp_port_pair: tuple[int, int]) -> None:
    """For TCP the kernel itself refuses overlapping binds: it must agree with the rule."""
    port = unused_tcp_port_pair[0]
    for scheme1, bind1, scheme2, bind2, overlap in OVERLAPS:
        key1, key2 = ListenKey("tcp", bind1, port), ListenKey("tcp", bind2, port)
        fam1, fam2 = family_of(scheme1), family_of(scheme2)  # type: ignore[arg-type]
        assert binds_overlap(key1, fam1, key2, fam2) is overlap
        with bind_socket(key1, fam1):
            try:
                bind_socket(key2, fam2).close()
                refused = False
            except OSError:
                refused = True
        assert refused is overlap, f"{bind1} ({scheme1}) then {bind2} ({scheme2})"


@pytest.fixture
def unused_tcp_port_pair() -> tuple[int, int]:
    """A port free on IPv4 and IPv6 loopback alike (bound by the test, then released)."""
    if not has_ipv6():
        pytest.skip("the host has no IPv6")
    port = free_port(host="::")  # "::" checks IPv4 too
    return port, port


def test_static_routes_overlapping_each_other_or_a_container_conflict() -> None:
    wide = RouteSpec("wide", "tcp", ListenKey("tcp", "::", 2222), (Backend("10.1.1.1", 22),),
                     source="r.yml")  # fmt: skip
    narrow = RouteSpec("narrow", "tcp4", ListenKey("tcp", "127.0.0.1", 2222),
                       (Backend("10.1.1.2", 22),), source="r.yml")  # fmt: skip
    state = build_desired([bound("c", 1, "tcp4", "0.0.0.0")], CTX, static=[wide, narrow])
    # static routes in file, then name order: "narrow" holds the port
    assert [r.alias for r in state.routes.values()] == ["narrow"]
    assert sorted((p.kind, p.route) for p in state.problems) == [
        ("conflict", "c"), ("conflict", "wide")
    ]  # fmt: skip


def test_overlaps_of_a_range_are_reported_once() -> None:
    wide = box("wide", 1, {"proxy.a.port": "3000-3009"}, ip="10.0.0.1")
    narrow = box("narrow", 2, {"proxy.b.port": "3005-3014", "proxy.b.bind": "127.0.0.1"},
                 ip="10.0.0.2")  # fmt: skip
    state = build_desired([narrow, wide], CTX)
    assert len(state.routes) == 15
    [problem] = state.problems
    assert problem.source == "narrow"
    assert "(5)" in problem.message


# -- loops: a route whose target is one of labelproxy's own listeners ---------------------
def host_net(name: str, created: float, labels: Mapping[str, str]) -> ContainerView:
    return ContainerView(id=f"id-{name}", name=name, created=created, labels=labels,
                         network_mode="host")  # fmt: skip


def static(alias: str, scheme: str, bind: str, port: int, host: str, target: int) -> RouteSpec:
    transport = "udp" if scheme.startswith("udp") else "tcp"
    return RouteSpec(alias, scheme, ListenKey(transport, bind, port), (Backend(host, target),),  # type: ignore[arg-type]
                     source="r.yml")  # fmt: skip


def test_a_host_network_container_targeting_its_own_listener_is_a_loop() -> None:
    looped = host_net("app", 1, {"proxy.app.port": "2222"})  # target 127.0.0.1:2222
    fine = host_net("ok", 2, {"proxy.ok.port": "2223:22"})
    state = build_desired([looped, fine], CTX)
    assert [r.alias for r in state.routes.values()] == ["ok"]
    [problem] = state.problems
    assert (problem.kind, problem.route, problem.source) == ("loop", "app", "app")
    assert (problem.label, problem.value) == ("proxy.app.port", "2222")
    assert "127.0.0.1:2222" in problem.message and "tcp://[::]:2222" in problem.message
    assert "its own listener" in problem.message


def test_a_range_targeting_itself_is_one_problem() -> None:
    state = build_desired([host_net("r", 1, {"proxy.r.port": "3000-3009"})], CTX)
    assert state.routes == {}
    [problem] = state.problems
    assert problem.kind == "loop"
    assert "(10)" in problem.message


@pytest.mark.parametrize(
    ("routes", "looped"),
    [
        # a target that is another route's listener (chaining labelproxy to itself)
        ([static("a", "tcp", "::", 2000, "127.0.0.1", 3000),
          static("b", "tcp", "::", 3000, "10.9.9.9", 22)], ["a"]),
        # A -> B -> A: both
        ([static("a", "tcp", "::", 2000, "127.0.0.1", 3000),
          static("b", "tcp", "::", 3000, "::1", 2000)], ["a", "b"]),
        # the unspecified address dialled is this host
        ([static("a", "tcp4", "0.0.0.0", 2000, "0.0.0.0", 2000)], ["a"]),
        # IPv4-mapped loopback
        ([static("a", "tcp", "::", 2000, "::ffff:127.0.0.1", 2000)], ["a"]),
        # a specific bind: only that address
        ([static("a", "tcp4", "127.0.0.1", 2000, "127.0.0.2", 2000)], []),
        ([static("a", "tcp4", "127.0.0.2", 2000, "127.0.0.2", 2000)], ["a"]),
        # an address some route binds is this host's own: a wildcard takes it too
        ([static("a", "tcp4", "0.0.0.0", 2000, "192.0.2.10", 2000),
          static("b", "tcp4", "192.0.2.10", 80, "10.9.9.9", 80)], ["a"]),
        # other addresses are not judged (labelproxy does not list the host's addresses)
        ([static("a", "tcp4", "0.0.0.0", 2000, "192.0.2.10", 2000)], []),
        # IPv4 wildcard vs IPv6 loopback, IPv6-only wildcard vs IPv4 loopback
        ([static("a", "tcp4", "0.0.0.0", 2000, "::1", 2000)], []),
        ([static("a", "tcp6", "::", 2000, "127.0.0.1", 2000)], []),
        # UDP to its own port loops; TCP and UDP on one port do not meet
        ([static("a", "udp", "::", 53, "127.0.0.1", 53)], ["a"]),
        ([static("a", "udp", "::", 53, "127.0.0.1", 5353),
          static("b", "tcp", "::", 5353, "10.9.9.9", 53)], []),
        # a host name is checked when it is dialled, not here
        ([static("a", "tcp", "::", 2000, "localhost", 2000)], []),
    ],
)  # fmt: skip
def test_loops_between_static_routes(routes: list[RouteSpec], looped: list[str]) -> None:
    state = build_desired([], CTX, static=routes)
    assert sorted(p.route for p in state.problems if p.kind == "loop") == looped
    assert sorted(r.alias for r in state.routes.values()) == sorted(
        r.alias for r in routes if r.alias not in looped
    )
    for problem in state.problems:
        assert (problem.source, problem.label) == ("r.yml", f"routes.{problem.route}.port")
