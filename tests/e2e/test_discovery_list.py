"""Views built from the container list (discovery's fast path) against views from inspect.

On the suite's private engine, a representative set of real containers (published, exposed-only,
udp, health checks, host / none / `container:` / user bridge networks, compose labels, two
containers claiming one port) is listed the way discovery lists them, and each view is compared
with `view_from_attrs` of the same container's inspect JSON. The pure rule that decides which
containers still need an inspect (`needing_details`) is table-tested below.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import docker
import pytest

from labelproxy.sources.containers import ContainerView, DiscoveryContext, PortBinding
from labelproxy.sources.desired import build_desired
from labelproxy.sources.discovery import ListMemo, list_running
from labelproxy.sources.dockerviews import needing_details, view_from_attrs, view_from_summary
from tests.support.dockerd import wait_for
from tests.support.ports import free_port

SLEEP = ["sh", "-c", "sleep 600"]
HEALTHY = {"test": ["CMD", "true"], "interval": 200_000_000, "retries": 3}
UNHEALTHY = {"test": ["CMD", "false"], "interval": 200_000_000, "retries": 1}


def _create(
    client: docker.DockerClient,
    image: str,
    *,
    labels: Mapping[str, str],
    network_mode: str = "host",
    exposed: list[Any] | None = None,
    bindings: Mapping[Any, Any] | None = None,
    healthcheck: Mapping[str, Any] | None = None,
) -> str:
    """Create and start a container with the low-level API: it alone can expose a port
    without publishing it."""
    host_config = client.api.create_host_config(
        init=True, network_mode=network_mode, port_bindings=dict(bindings or {})
    )
    created = client.api.create_container(
        image, SLEEP, labels=dict(labels), ports=exposed, host_config=host_config,
        healthcheck=dict(healthcheck) if healthcheck else None,
    )  # fmt: skip
    client.api.start(created["Id"])
    return str(created["Id"])


def test_list_views_equal_inspect_views(
    docker_client: docker.DockerClient, busybox_image: str
) -> None:
    client, image = docker_client, busybox_image
    net = client.networks.create(f"lp-list-{free_port()}", driver="bridge")
    udp = free_port(kind=socket.SOCK_DGRAM)
    port = free_port()
    ids = {
        "published": _create(
            client, image, network_mode=net.name, exposed=[22, (53, "udp"), 80],
            bindings={22: ("127.0.0.1", free_port()), "53/udp": ("127.0.0.1", udp),
                      80: [("127.0.0.1", free_port()), ("127.0.0.2", free_port())]},
            labels={"proxy.ssh.port": f"{free_port()}:22", "proxy.dns.port": f"{free_port()}:53"},
        ),
        "exposed": _create(client, image, network_mode=net.name, exposed=[80, (53, "udp")],
                           labels={"proxy.dns.port": f"{free_port()}:53"}),
        "host_exposed_udp": _create(client, image, exposed=[(5353, "udp")],
                                    labels={"proxy.mdns.port": f"{free_port()}:5353"}),
        "host_exposed_scheme": _create(client, image, exposed=[80],
                                       labels={"proxy.w.port": f"{free_port()}:80",
                                               "proxy.w.scheme": "tcp4"}),
        "none": _create(client, image, network_mode="none", labels={}),
        "healthy": _create(client, image, healthcheck=HEALTHY, labels={"proxy.h.port": "1:2"}),
        "unhealthy": _create(client, image, healthcheck=UNHEALTHY, labels={}),
        "compose": _create(
            client, image, network_mode=net.name,
            labels={"com.docker.compose.project": "demo", "com.docker.compose.service": "web",
                    "proxy.aliases": "web", "proxy.web.port": f"{port}:8080"},
        ),
        "conflicting": _create(client, image, labels={"proxy.other.port": f"{port}:9090"}),
    }  # fmt: skip
    ids["shared"] = _create(client, image, network_mode=f"container:{ids['published']}",
                            labels={"proxy.s.port": f"{free_port()}:22"})  # fmt: skip
    wait_for(lambda: all(
        (client.api.inspect_container(ids[k])["State"].get("Health") or {}).get("Status") == h
        for k, h in (("healthy", "healthy"), ("unhealthy", "unhealthy"))
    ), timeout=20, what="the health checks")  # fmt: skip

    listed, known = list_running(client, ListMemo(), label_prefix="proxy")
    details = known.details
    fast = {v.id: v for v in listed if v.id in ids.values()}
    exact = {cid: view_from_attrs(client.api.inspect_container(cid)) for cid in ids.values()}
    assert fast.keys() == exact.keys()
    for kind, cid in ids.items():
        got, want = fast[cid], exact[cid]
        if cid in details:
            assert got == want, kind
            continue
        assert got.created == math.floor(want.created), kind
        if kind == "host_exposed_scheme":  # exposed-only port unseen, unused: the scheme is set
            assert got.ports == () and want.ports == (PortBinding(80, "tcp"),)
            want = replace(want, ports=())
        assert replace(got, created=want.created) == want, kind
    assert ids["host_exposed_udp"] in details  # its scheme defaults from the exposed port
    assert fast[ids["host_exposed_udp"]].protocols_of(5353) == {"udp"}
    assert (fast[ids["healthy"]].health, fast[ids["unhealthy"]].health) == ("healthy", "unhealthy")
    assert fast[ids["shared"]].network_mode == f"container:{ids['published']}"
    assert fast[ids["compose"]].service == "compose:demo/web"
    if math.floor(exact[ids["compose"]].created) == math.floor(exact[ids["conflicting"]].created):
        assert {ids["compose"], ids["conflicting"]} <= details.keys()  # who was first matters

    # what matters in the end: the same routes, pools, conflicts and problems
    ctx = DiscoveryContext()
    assert build_desired(fast.values(), ctx) == build_desired(exact.values(), ctx)

    # details are fetched once: a second list inspects nothing new and gives the same views
    again, known_again = list_running(client, known, label_prefix="proxy")
    assert known_again == known
    assert {v.id: v for v in again if v.id in ids.values()} == fast


def _view(cid: str, created: float, labels: Mapping[str, str], **kw: Any) -> ContainerView:
    return ContainerView(id=cid, name=cid, created=created, labels=labels, **kw)


PORT_80 = {"proxy.a.port": "80", "proxy.a.scheme": "tcp"}


@pytest.mark.parametrize(
    ("views", "known", "expected"),
    [
        ([_view("a", 100, PORT_80), _view("b", 100, PORT_80)], (), {"a", "b"}),
        ([_view("a", 100, PORT_80), _view("b", 100, PORT_80)], ("a",), {"b"}),
        ([_view("a", 100.7, PORT_80), _view("b", 100, PORT_80)], (), {"a", "b"}),
        ([_view("a", 100, PORT_80), _view("b", 101, PORT_80)], (), set()),
        ([_view("a", 100, PORT_80),
          _view("b", 100, {"proxy.b.port": "81", "proxy.b.scheme": "udp"})], (), set()),
        ([_view("a", 100, PORT_80),
          _view("b", 100, {"proxy.aliases": "x,y", "proxy.*.scheme": "tcp",
                           "proxy.#2.port": "70-90:1070-1090"})], (), {"a", "b"}),
        ([_view("a", 100, PORT_80), _view("b", 100, {**PORT_80, "proxy.exclude": "true"})],
         (), set()),
        ([_view("a", 100, {"proxy.a.port": "53"})], (), {"a"}),
        ([_view("a", 100, {"proxy.a.port": "53"}, ports=(PortBinding(53, "udp"),))], (), set()),
        ([_view("a", 100, {"proxy.a.port": "53"})], ("a",), set()),
        ([_view("a", 100, {"proxy.aliases": "a", "proxy.*.scheme": "udp", "proxy.a.port": "53"})],
         (), set()),
        ([_view("a", 100, {"other.a.port": "53"}), _view("b", 100, {"other.a.port": "53"})],
         (), set()),
    ],
)  # fmt: skip
def test_needing_details(
    views: list[ContainerView], known: tuple[str, ...], expected: set[str]
) -> None:
    assert needing_details(views, label_prefix="proxy", known=known) == expected


def test_list_view_order_is_creation_order_even_within_a_second(
    docker_client: docker.DockerClient, busybox_image: str
) -> None:
    """Two containers claiming one port, created back to back: the first one holds it."""
    port = free_port()
    first = _create(docker_client, busybox_image, labels={"proxy.one.port": f"{port}:1"})
    second = _create(docker_client, busybox_image, labels={"proxy.two.port": f"{port}:2"})
    listed, _ = list_running(docker_client, ListMemo(), label_prefix="proxy")
    assert [v.id for v in listed if v.id in (first, second)] == [first, second]
    state = build_desired(listed, DiscoveryContext())
    [route] = [r for r in state.routes.values() if r.key.port == port]
    assert route.alias == "one"


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        (
            {"Id": "a" * 64, "Names": ["/web/db", "/db"], "Created": 1714557600,
             "Labels": None, "State": "running", "Status": "Up 2 hours (health: starting)",
             "HostConfig": {"NetworkMode": "default"},
             "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "192.0.2.2"}}},
             "Ports": [{"PrivatePort": 9, "Type": "sctp"}, {"PrivatePort": 80, "Type": "tcp"},
                       {"IP": "::", "PrivatePort": 53, "PublicPort": 1053, "Type": "udp"}]},
            ContainerView(id="a" * 64, name="db", created=1714557600.0, labels={},
                          health="starting", network_mode="bridge",
                          networks={"bridge": "192.0.2.2"},
                          ports=(PortBinding(53, "udp", "::", 1053), PortBinding(80, "tcp"))),
        ),
        (
            {"Id": "b" * 64, "Names": ["/api"], "Created": 1714557601,
             "Labels": {"com.docker.swarm.service.name": "s"}, "State": "running",
             "Status": "Up 1 second", "Health": {"Status": "unhealthy", "FailingStreak": 3},
             "HostConfig": {"NetworkMode": "host"},
             "NetworkSettings": {"Networks": {"host": {"IPAddress": ""}}}, "Ports": []},
            ContainerView(id="b" * 64, name="api", created=1714557601.0,
                          labels={"com.docker.swarm.service.name": "s"}, health="unhealthy",
                          network_mode="host", networks={"host": ""}, service="swarm:s"),
        ),
    ],
)  # fmt: skip
def test_view_from_summary_table(summary: dict[str, Any], expected: ContainerView) -> None:
    assert view_from_summary(summary) == expected
