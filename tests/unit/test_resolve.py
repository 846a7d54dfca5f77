"""Table tests for the target resolution order (resolve.py), directly and through labels."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from labelproxy.sources.containers import ContainerView, DiscoveryContext, PortBinding
from labelproxy.sources.labels import parse_container
from labelproxy.sources.resolve import AddressError, Target, resolve_target
from labelproxy.spec import Transport

NETS = {"zeta": "10.0.9.9", "backend": "10.0.2.2", "alpha": "10.0.1.1"}
PUBLISHED = (PortBinding(22, "tcp", "0.0.0.0", 2022), PortBinding(22, "tcp", "::", 2022))
REMOTE = DiscoveryContext(daemon_host="docker.lan")
SHARED = DiscoveryContext(own_networks=frozenset({"zeta", "backend"}))


def container(
    *,
    mode: str = "bridge",
    networks: Mapping[str, str] | None = None,
    ports: tuple[PortBinding, ...] = (),
) -> ContainerView:
    return ContainerView(
        id="abc",
        name="svc-1",
        created=1.0,
        labels={},
        network_mode=mode,
        networks=NETS if networks is None else networks,
        ports=ports,
    )


@pytest.mark.parametrize(
    ("view", "ctx", "host", "network", "transport", "expected"),
    [
        # 1. the host label beats everything
        (container(mode="host"), REMOTE, "db.lan", "backend", "tcp",
         Target("db.lan", 22, "host_label")),
        # 2. host network mode: loopback, or the remote daemon's host
        (container(mode="host", networks={"host": ""}), DiscoveryContext(), None, "backend",
         "tcp", Target("127.0.0.1", 22, "host_network")),
        (container(mode="host"), REMOTE, None, None, "tcp",
         Target("docker.lan", 22, "host_network")),
        # 3. proxy.network beats shared networks and published ports
        (container(ports=PUBLISHED), SHARED, None, "alpha", "tcp",
         Target("10.0.1.1", 22, "proxy_network")),
        # 4. a network labelproxy shares, first in name order
        (container(ports=PUBLISHED), SHARED, None, None, "tcp",
         Target("10.0.2.2", 22, "shared_network")),
        # 5. the published host port for the route's protocol
        (container(ports=PUBLISHED), DiscoveryContext(), None, None, "tcp",
         Target("127.0.0.1", 2022, "published")),
        (container(ports=PUBLISHED), REMOTE, None, None, "tcp",
         Target("docker.lan", 2022, "published")),
        (container(ports=(PortBinding(22, "tcp", "192.168.1.10", 2200),)), DiscoveryContext(),
         None, None, "tcp", Target("192.168.1.10", 2200, "published")),
        (container(ports=(PortBinding(22, "tcp", "::", 2201),)), DiscoveryContext(),
         None, None, "tcp", Target("::1", 2201, "published")),
        (container(ports=(PortBinding(22, "tcp", "", 2202),)), DiscoveryContext(),
         None, None, "tcp", Target("127.0.0.1", 2202, "published")),
        # published for the other protocol, or only exposed: not used
        (container(ports=PUBLISHED), DiscoveryContext(), None, None, "udp",
         Target("10.0.1.1", 22, "network")),
        (container(ports=(PortBinding(22, "tcp"),)), DiscoveryContext(), None, None, "tcp",
         Target("10.0.1.1", 22, "network")),
        # 6. the first network in name order that gives the container an address
        (container(), DiscoveryContext(), None, None, "tcp", Target("10.0.1.1", 22, "network")),
        (container(networks={"a": "", "b": "10.0.0.2"}), DiscoveryContext(), None, None, "tcp",
         Target("10.0.0.2", 22, "network")),
        (container(networks={"b": "10.0.0.2"}), SHARED, None, None, "tcp",
         Target("10.0.0.2", 22, "network")),
    ],
)  # fmt: skip
def test_resolution_order(
    view: ContainerView,
    ctx: DiscoveryContext,
    host: str | None,
    network: str | None,
    transport: Transport,
    expected: Target,
) -> None:
    got = resolve_target(view, ctx, target_port=22, transport=transport, host=host, network=network)
    assert got == expected


@pytest.mark.parametrize(
    ("view", "network", "field", "expected"),
    [
        (container(networks={}), None, "port", "no reachable address"),
        (container(mode="none", networks={"none": ""}), None, "port", "no reachable address"),
        (container(mode="container:f00", networks={}), None, "port", "'container:f00'"),
        (container(), "frontend", "network", "not on network 'frontend'"),
        (container(networks={"frontend": ""}), "frontend", "network", "not on network"),
    ],
)
def test_unreachable(view: ContainerView, network: str | None, field: str, expected: str) -> None:
    with pytest.raises(AddressError) as caught:
        resolve_target(view, DiscoveryContext(), target_port=22, transport="tcp", network=network)
    assert caught.value.field == field
    assert expected in caught.value.message


def test_labels_use_the_published_port_per_port_of_a_range() -> None:
    view = ContainerView(
        id="abc",
        name="ftp-1",
        created=1.0,
        labels={"proxy.ftp.port": "2100-2101:21-22"},
        networks={},
        ports=(PortBinding(21, "tcp", "0.0.0.0", 3021), PortBinding(22, "tcp", "0.0.0.0", 3022)),
    )
    specs, problems = parse_container(view, DiscoveryContext())
    assert problems == ()
    assert [(s.key.port, str(s.backends[0])) for s in specs] == [
        (2100, "127.0.0.1:3021"),
        (2101, "127.0.0.1:3022"),
    ]


def test_range_with_unpublished_ports_reports_them_once() -> None:
    view = ContainerView(
        id="abc",
        name="ftp-1",
        created=1.0,
        labels={"proxy.ftp.port": "2100-2103:21-24"},
        networks={},
        ports=(PortBinding(21, "tcp", "0.0.0.0", 3021),),
    )
    specs, problems = parse_container(view, DiscoveryContext())
    assert [s.key.port for s in specs] == [2100]
    [problem] = problems
    assert problem.kind == "address"
    assert "22-24, 3 ports" in problem.message
    assert "ftp-1" in str(problem)
    assert "proxy.ftp.port='2100-2103:21-24'" in str(problem)
