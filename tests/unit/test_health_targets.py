"""`health_targets`: every route gets a target; the ports of a range follow its first port
(one check per backend per interval, whatever the range's length)."""

from __future__ import annotations

from labelproxy.health.targets import health_targets
from labelproxy.healthcheck import HealthCheck
from labelproxy.spec import Backend, ListenKey, RouteOptions, RouteSpec

TCP = HealthCheck("tcp")


def port_range(first: int, count: int, *, target: int, backends: tuple[tuple[str, str], ...],
               check: HealthCheck = TCP, alias: str = "x", source: str = "c",
               ) -> dict[ListenKey, RouteSpec]:
    """The routes of `alias` on ports first..first+count-1 -> target..., one backend per
    (host, container id) in `backends`."""
    routes = {}
    for i in range(count):
        key = ListenKey("tcp", "0.0.0.0", first + i)
        pool = tuple(Backend(host, target + i, cid, cid) for host, cid in backends)
        routes[key] = RouteSpec(alias, "tcp", key, pool, RouteOptions(healthcheck=check),
                                source=source)
    return routes


def test_a_range_is_checked_on_its_first_port_for_each_replica() -> None:
    routes = port_range(30000, 5000, target=40000,
                        backends=(("127.0.0.1", "a"), ("127.0.0.1", "b")))
    targets = health_targets(routes)
    first = ListenKey("tcp", "0.0.0.0", 30000)
    assert len(targets) == 5000
    assert [k for k, t in targets.items() if t.follows is None] == [first]
    assert all(t.follows == first for k, t in targets.items() if k != first)
    assert targets[first].backends == routes[first].backends  # its two replicas: two checks


def test_routes_that_are_not_one_range_are_checked_each_on_their_own() -> None:
    routes = {
        **port_range(30000, 3, target=40000, backends=(("127.0.0.1", "a"),)),
        **port_range(31000, 2, target=41000, backends=(("127.0.0.1", "a"),), alias="y"),
        **port_range(32000, 2, target=42000, backends=(("127.0.0.1", "a"),),
                     check=HealthCheck("none"), alias="z"),
    }
    # a port of x whose backend is another container's: not the range's first port's
    odd = ListenKey("tcp", "0.0.0.0", 30002)
    routes[odd] = RouteSpec("x", "tcp", odd, (Backend("127.0.0.1", 40002, "b", "b"),),
                            RouteOptions(healthcheck=TCP), source="c")
    follows = {k.port: t.follows for k, t in health_targets(routes).items()}
    first = ListenKey("tcp", "0.0.0.0", 30000)
    assert follows == {30000: None, 30001: first, 30002: None,
                       31000: None, 31001: ListenKey("tcp", "0.0.0.0", 31000),
                       32000: None, 32001: None}  # checks off: nothing to share
