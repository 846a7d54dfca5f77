"""Table tests for container labels -> route specs (labels.py, fields.py)."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping

import pytest

from labelproxy.healthcheck import HealthCheck
from labelproxy.sources.containers import ContainerView, DiscoveryContext, PortBinding
from labelproxy.sources.labels import LabelFacts, label_facts, parse_container
from labelproxy.spec import Backend, ListenKey, Problem, RouteOptions, RouteSpec

CTX = DiscoveryContext()
NAME = "shop-db-1"


def view(
    labels: Mapping[str, str],
    *,
    ports: tuple[PortBinding, ...] = (),
    networks: Mapping[str, str] | None = None,
) -> ContainerView:
    return ContainerView(
        id="c0ffee",
        name=NAME,
        created=100.0,
        labels=labels,
        networks={"app": "172.20.0.5"} if networks is None else networks,
        ports=ports,
    )


def parse(
    labels: Mapping[str, str], *, ctx: DiscoveryContext = CTX, ports: tuple[PortBinding, ...] = ()
) -> tuple[dict[str, list[RouteSpec]], tuple[Problem, ...]]:
    specs, problems = parse_container(view(labels, ports=ports), ctx)
    by_alias: dict[str, list[RouteSpec]] = {}
    for spec in specs:
        by_alias.setdefault(spec.alias, []).append(spec)
    return by_alias, problems


def only_route(labels: Mapping[str, str], *, ports: tuple[PortBinding, ...] = ()) -> RouteSpec:
    routes, problems = parse(labels, ports=ports)
    assert problems == ()
    [specs] = routes.values()
    [spec] = specs
    return spec


def assert_names(problem: Problem, label: str, value: str) -> None:
    """A user reading the problem sees the container, the label and the value."""
    text = str(problem)
    assert NAME in text
    assert label in text
    assert value in text
    assert problem.source == NAME
    assert problem.label == label
    assert problem.value == value


def test_minimal_route_relays_to_the_container_network_address() -> None:
    spec = only_route({"proxy.ssh.port": "2222:22"})
    assert spec == RouteSpec(
        alias="ssh",
        scheme="tcp",
        key=ListenKey("tcp", "::", 2222),
        backends=(Backend("172.20.0.5", 22, "c0ffee", NAME),),
        options=RouteOptions(healthcheck=HealthCheck("tcp")),  # the TCP default: a connect
        source=NAME,
    )


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({}, {}),
        ({"com.example.owner": "me", "traefik.enable": "true"}, {}),
        ({"proxyx.ssh.port": "22"}, {}),
        ({"proxy.exclude": "true", "proxy.ssh.port": "22"}, {}),
        ({"proxy.exclude": "YES", "proxy.ssh.port": "22"}, {}),
        ({"proxy.exclude": "0", "proxy.ssh.port": "22"}, {"ssh": [22]}),
        ({"proxy.network": "app"}, {}),
        ({"proxy.aliases": "a, b", "proxy.a.port": "1000", "proxy.b.port": "1001"},
         {"a": [1000], "b": [1001]}),
        ({"proxy.aliases": "a,b", "proxy.#1.port": "1000", "proxy.#2.port": "1001"},
         {"a": [1000], "b": [1001]}),
        ({"proxy.aliases": "a,b", "proxy.*.port": "1000", "proxy.b.port": "1001"},
         {"a": [1000], "b": [1001]}),
        ({"proxy.*.port": "1000", "proxy.a.scheme": "tcp"}, {"a": [1000]}),
        ({"proxy.aliases": "a", "proxy.#1.port": "1000", "proxy.a.port": "1001"}, {"a": [1001]}),
        ({"proxy.aliases": "a", "proxy.*.port": "1000", "proxy.#1.port": "1001"}, {"a": [1001]}),
        ({"proxy.aliases": "db.example.com", "proxy.db.example.com.port": "5432"},
         {"db.example.com": [5432]}),
        ({"proxy.ftp.port": "30000-30002:40000-40002"}, {"ftp": [30000, 30001, 30002]}),
        ({"proxy.ftp.port": "30000-30002"}, {"ftp": [30000, 30001, 30002]}),
    ],
)  # fmt: skip
def test_aliases_and_listen_ports(labels: dict[str, str], expected: dict[str, list[int]]) -> None:
    routes, problems = parse(labels)
    assert problems == ()
    assert {alias: [s.key.port for s in specs] for alias, specs in routes.items()} == expected


def test_range_maps_ports_one_to_one() -> None:
    routes, _ = parse({"proxy.ftp.port": "30000-30002:40000-40002"})
    assert [(s.key.port, s.backends[0].port) for s in routes["ftp"]] == [
        (30000, 40000), (30001, 40001), (30002, 40002),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "attribute", "expected"),
    [
        ("port", "8080", "target", 8080),
        ("port", " 80 : 8080 ", "target", 8080),
        ("scheme", "tcp4", "scheme", "tcp4"),
        ("scheme", "TCP6", "scheme", "tcp6"),
        ("scheme", "udp", "scheme", "udp"),
        ("scheme", "udp4", "key", ListenKey("udp", "0.0.0.0", 80)),
        ("scheme", "udp6", "key", ListenKey("udp", "::", 80)),
        ("bind", "127.0.0.1", "key", ListenKey("tcp", "127.0.0.1", 80)),
        ("bind", "[::1]", "key", ListenKey("tcp", "::1", 80)),
        ("bind", "0:0::0", "key", ListenKey("tcp", "::", 80)),
        ("host", "10.1.2.3", "backends", (Backend("10.1.2.3", 80, "c0ffee", NAME),)),
        ("host", "db.internal", "backends", (Backend("db.internal", 80, "c0ffee", NAME),)),
        ("host", "shop_db_1", "backends", (Backend("shop_db_1", 80, "c0ffee", NAME),)),
        ("proxy_protocol", "v1", "proxy_protocol", "v1"),
        ("proxy_protocol", "V2", "proxy_protocol", "v2"),
        ("proxy_protocol", "off", "proxy_protocol", None),
        ("allow", "10.0.0.0/8, ::1", "allow",
         (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))),
        ("deny", "192.168.1.7", "deny", (ipaddress.ip_network("192.168.1.7/32"),)),
        ("allow", "", "allow", ()),
        ("max_connections", "250", "max_connections", 250),
        ("idle_timeout", "1h30m", "idle_timeout", 5400.0),
        ("idle_timeout", "90", "idle_timeout", 90.0),
        ("connect_timeout", "250ms", "connect_timeout", 0.25),
        ("load_balance", "least_conn", "load_balance", "least_conn"),
        ("load_balance", "source_hash", "load_balance", "source_hash"),
        ("load_balance", "round_robin", "load_balance", "round_robin"),
        ("forwarding", "relay", "forwarding", "relay"),
        ("forwarding", " Auto ", "forwarding", "auto"),
    ],
)  # fmt: skip
def test_good_field(field: str, value: str, attribute: str, expected: object) -> None:
    labels = {"proxy.web.port": "80", f"proxy.web.{field}": value}
    if field == "port":
        labels["proxy.web.port"] = value
    spec = only_route(labels)
    if attribute == "target":
        got: object = spec.backends[0].port
    elif hasattr(spec.options, attribute):
        got = getattr(spec.options, attribute)
    else:
        got = getattr(spec, attribute)
    assert got == expected


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("port", "", "LISTEN:TARGET"),
        ("port", "http", "LISTEN:TARGET"),
        ("port", "0:22", "1-65535"),
        ("port", "65536", "1-65535"),
        ("port", "22:", "LISTEN:TARGET"),
        ("port", "-5", "LISTEN:TARGET"),
        ("port", "10-12:20-21", "equal length"),
        ("port", "12-10", "A <= B"),
        ("port", "1:2:3", "LISTEN:TARGET"),
        ("port", "²", "LISTEN:TARGET"),
        ("scheme", "sctp", "tcp, tcp4, tcp6, udp, udp4, udp6"),
        ("bind", "localhost", "IP address"),
        ("bind", "10.0.0.300", "IP address"),
        ("host", "db:5432", "without a port"),
        ("host", "bad host", "host name or IP address"),
        ("host", "-leading.dash", "host name or IP address"),
        ("proxy_protocol", "v3", "v1 or v2"),
        ("allow", "10.0.0.0/33", "CIDR"),
        ("deny", "everyone", "CIDR"),
        ("max_connections", "0", "positive whole number"),
        ("max_connections", "-1", "positive whole number"),
        ("max_connections", "lots", "positive whole number"),
        ("idle_timeout", "5 minutes", "duration"),
        ("idle_timeout", "0s", "positive duration"),
        ("idle_timeout", "nan", "duration"),
        ("idle_timeout", "inf", "duration"),
        ("idle_timeout", "1e400", "duration"),
        ("idle_timeout", "9999h", "at most 8760h"),
        ("connect_timeout", "0", "positive duration"),
        ("connect_timeout", "NaN", "duration"),
        ("port", "53/udp", "use port 53 with scheme udp"),
        ("port", "2222:22/tcp", "use port 2222:22 with scheme tcp"),
        ("connect_timeout", "", "duration"),
        ("load_balance", "random", "round_robin, least_conn, source_hash"),
        ("forwarding", "nftables", "expected one of auto, relay"),
        ("forwarding", "kernel", "LABELPROXY_FORWARDING=kernel"),
        ("timeout", "5s", "unknown field 'timeout'; expected one of: port, scheme"),
    ],
)  # fmt: skip
def test_bad_field_fails_only_its_alias(field: str, value: str, expected: str) -> None:
    labels = {"proxy.bad.port": "80", f"proxy.bad.{field}": value, "proxy.good.port": "81"}
    routes, problems = parse(labels)
    assert list(routes) == ["good"]
    [problem] = problems
    assert problem.kind == "label"
    assert problem.route == "bad"
    assert expected in problem.message
    assert_names(problem, f"proxy.bad.{field}", value)


@pytest.mark.parametrize(
    ("labels", "label", "value", "expected"),
    [
        ({"proxy.a.port": "80", "proxy.a.scheme": "tcp4", "proxy.a.bind": "::1"},
         "proxy.a.bind", "::1", "IPv4 address for scheme tcp4"),
        ({"proxy.a.port": "80", "proxy.a.scheme": "udp6", "proxy.a.bind": "127.0.0.1"},
         "proxy.a.bind", "127.0.0.1", "IPv6 address for scheme udp6"),
        ({"proxy.a.port": "53", "proxy.a.scheme": "udp", "proxy.a.proxy_protocol": "v1"},
         "proxy.a.proxy_protocol", "v1", "expected v2"),
        ({"proxy.a.scheme": "tcp"}, "proxy.a.port", "", "port is required"),
        ({"proxy.aliases": "a", "proxy.#2.port": "80"}, "proxy.#2.port", "80", "lists 1: a"),
        ({"proxy.aliases": "a", "proxy.#x.port": "80"}, "proxy.#x.port", "80", "from 1"),
        ({"proxy.*.port": "80"}, "proxy.*.port", "80", "lists none"),
        ({"proxy.alias": "a"}, "proxy.alias", "a", "expected proxy.<alias>.<field>"),
        ({"proxy..port": "80"}, "proxy..port", "80", "expected an alias name"),
        ({"proxy.exclude": "maybe", "proxy.a.port": "80"}, "proxy.exclude", "maybe",
         "true or false"),
    ],
)  # fmt: skip
def test_route_and_container_problems(
    labels: dict[str, str], label: str, value: str, expected: str
) -> None:
    routes, problems = parse(labels)
    assert routes == {}
    [problem] = [p for p in problems if p.label == label]
    assert expected in problem.message
    assert_names(problem, label, value)


def test_udp_only_proxy_protocol_v1_from_defaulted_scheme_is_a_problem() -> None:
    udp = (PortBinding(53, "udp"),)
    routes, problems = parse({"proxy.dns.port": "53", "proxy.dns.proxy_protocol": "v1"}, ports=udp)
    assert routes == {}
    [problem] = problems
    assert_names(problem, "proxy.dns.proxy_protocol", "v1")


def test_wildcard_error_fails_every_alias_but_names_the_wildcard_label() -> None:
    routes, problems = parse({"proxy.aliases": "a,b", "proxy.*.port": "80", "proxy.*.deny": "x"})
    assert routes == {}
    assert sorted(p.route for p in problems) == ["a", "b"]
    for problem in problems:
        assert_names(problem, "proxy.*.deny", "x")


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ((), "tcp"),
        ((PortBinding(53, "udp"),), "udp"),
        ((PortBinding(53, "udp", "0.0.0.0", 5353),), "udp"),
        ((PortBinding(53, "udp"), PortBinding(53, "tcp")), "tcp"),
        ((PortBinding(54, "udp"),), "tcp"),
    ],
)
def test_scheme_defaults_to_udp_when_target_is_only_udp(
    ports: tuple[PortBinding, ...], expected: str
) -> None:
    spec = only_route({"proxy.dns.port": "1053:53"}, ports=ports)
    assert spec.scheme == expected
    assert spec.key.transport == expected


def test_explicit_scheme_beats_exposed_udp() -> None:
    spec = only_route(
        {"proxy.dns.port": "53", "proxy.dns.scheme": "tcp"}, ports=(PortBinding(53, "udp"),)
    )
    assert spec.scheme == "tcp"


@pytest.mark.parametrize(
    "labels",
    [
        {"proxy.a.port": "80", "proxy.a.healthcheck.path": "/health"},
        {"proxy.a.port": "80", "proxy.a.middlewares.redirect.bypass": "x"},
        {"proxy.a.port": "80", "proxy.a.homepage.name": "A"},
        {"proxy.a.port": "80", "proxy.a.load_balance.link": "app"},
        {"proxy.a.port": "80", "proxy.a.no_tls_verify": "true"},
        {"proxy.a.port": "80", "proxy.*.homepage.show": "false"},
        {"proxy.a.port": "80", "proxy.stop_timeout": "10s"},
        {"proxy.a.port": "80", "proxy.b.scheme": "http", "proxy.b.port": "3000"},
    ],
)
def test_godoxy_http_labels_are_ignored(labels: dict[str, str]) -> None:
    routes, problems = parse(labels)
    assert problems == ()
    assert list(routes) == ["a"]


def test_godoxy_stream_labels_work_unchanged() -> None:
    labels = {
        "proxy.aliases": "ssh,dns",
        "proxy.#1.port": "2222:22",
        "proxy.#1.scheme": "tcp",
        "proxy.#2.port": "5353:53",
        "proxy.#2.scheme": "udp",
        "proxy.#2.bind": "0.0.0.0",
        "proxy.ssh.host": "10.9.9.9",
    }
    routes, problems = parse(labels)
    assert problems == ()
    assert routes["ssh"][0].key == ListenKey("tcp", "::", 2222)
    assert routes["ssh"][0].backends[0].host == "10.9.9.9"
    assert routes["dns"][0].key == ListenKey("udp", "0.0.0.0", 5353)


def test_custom_label_prefix() -> None:
    ctx = DiscoveryContext(label_prefix="l4")
    routes, problems = parse({"l4.ssh.port": "2222:22", "proxy.web.port": "80"}, ctx=ctx)
    assert problems == ()
    assert list(routes) == ["ssh"]


def test_address_problem_names_container_port_label_and_value() -> None:
    specs, problems = parse_container(
        view({"proxy.ssh.port": "2222:22"}, networks={}), DiscoveryContext()
    )
    assert specs == ()
    [problem] = problems
    assert problem.kind == "address"
    assert "no reachable address" in problem.message
    assert_names(problem, "proxy.ssh.port", "2222:22")


def test_proxy_network_not_joined_is_a_problem_on_the_network_label() -> None:
    specs, problems = parse_container(
        view({"proxy.network": "backend", "proxy.ssh.port": "22"}), DiscoveryContext()
    )
    assert specs == ()
    [problem] = problems
    assert problem.kind == "address"
    assert "app" in problem.message
    assert_names(problem, "proxy.network", "backend")


@pytest.mark.parametrize(
    ("labels", "listen_ports", "scheme_from_ports"),
    [
        ({}, set(), False),
        ({"other.a.port": "80"}, set(), False),
        ({"proxy.a.port": "80"}, {80}, True),
        ({"proxy.a.port": "80:8080", "proxy.a.scheme": "udp"}, {80}, False),
        ({"proxy.aliases": "a,b", "proxy.*.scheme": "tcp", "proxy.a.port": "1-3:11-13",
          "proxy.#2.port": "7"}, {1, 2, 3, 7}, False),
        ({"proxy.aliases": "a,b", "proxy.a.scheme": "tcp", "proxy.a.port": "1",
          "proxy.b.port": "2"}, {1, 2}, True),
        ({"proxy.a.port": "80", "proxy.exclude": "true"}, set(), False),
        ({"proxy.a.port": "80", "proxy.exclude": "maybe"}, set(), False),
        ({"proxy.a.port": "not-a-port", "proxy.a.scheme": "tcp"}, set(), False),
        ({"proxy.a.port": "80", "proxy.a.scheme": "https"}, set(), False),
    ],
)  # fmt: skip
def test_label_facts(
    labels: dict[str, str], listen_ports: set[int], scheme_from_ports: bool
) -> None:
    """What discovery needs to know before trusting a container's list entry."""
    facts = label_facts(labels, label_prefix="proxy")
    assert facts == LabelFacts(frozenset(listen_ports), scheme_from_ports)


@pytest.mark.parametrize(
    "alias",
    [
        pytest.param("ssh", id="short"),
        pytest.param("a" * 64, id="64 characters"),
        pytest.param("my-app_2", id="compose-style service name"),
        pytest.param("shop-db-1", id="compose container name"),
        pytest.param("Web.Example.com", id="host name with capitals"),
        pytest.param("postgres_16.replica-0", id="mixed"),
    ],
)
def test_alias_within_the_bounds_is_a_route(alias: str) -> None:
    routes, problems = parse({"proxy.aliases": alias, f"proxy.{alias}.port": "5432"})
    assert problems == ()
    assert list(routes) == [alias]


@pytest.mark.parametrize(
    ("labels", "label", "alias", "expected"),
    [
        pytest.param({"proxy." + "a" * 65 + ".port": "80"}, "proxy." + "a" * 65 + ".port",
                     "a" * 65, "it has 65 characters", id="65 characters"),
        pytest.param({"proxy." + "x" * 500 + ".port": "80"}, "proxy." + "x" * 500 + ".port",
                     "x" * 500, "it has 500 characters", id="500 characters"),
        pytest.param({"proxy.caf\u00e9.port": "80"}, "proxy.caf\u00e9.port", "caf\u00e9",
                     "'\u00e9' is not allowed", id="not ascii"),
        pytest.param({"proxy.a:b.port": "80"}, "proxy.a:b.port", "a:b", "':' is not allowed",
                     id="colon"),
        pytest.param({"proxy.aliases": "my app", "proxy.#1.port": "80"}, "proxy.aliases",
                     "my app", "' ' is not allowed", id="space, listed in aliases"),
        pytest.param({"proxy.aliases": "a{b}"}, "proxy.aliases", "a{b}", "'{' is not allowed",
                     id="listed only"),
        pytest.param({"proxy.a\"b.port": "80", "proxy.a\"b.scheme": "udp"}, "proxy.a\"b.port",
                     "a\"b", "'\"' is not allowed", id="quote, first label of the alias"),
    ],
)  # fmt: skip
def test_alias_out_of_bounds_is_a_label_problem_without_a_route_name(
    labels: dict[str, str], label: str, alias: str, expected: str
) -> None:
    """An alias is a label value of every series of its route: longer than 64 characters or
    outside [A-Za-z0-9_.-] it is refused (the container's other aliases are served)."""
    routes, problems = parse({**labels, "proxy.fine.port": "2222:22"})
    assert list(routes) == ["fine"]
    [problem] = problems
    assert problem.kind == "label"
    assert problem.route == ""  # the bad alias is not echoed into route labels
    assert "route name of at most 64 characters" in problem.message
    assert expected in problem.message
    assert_names(problem, label, alias)


def test_healthcheck_labels_give_the_route_its_check() -> None:
    spec = only_route({
        "proxy.db.port": "6379", "proxy.db.healthcheck": "redis",
        "proxy.db.healthcheck.interval": "1s", "proxy.db.healthcheck.rise": "3",
    })  # fmt: skip
    check = spec.options.healthcheck
    assert (check.kind, check.interval, check.timeout, check.rise) == ("redis", 1.0, 1.0, 3)


def test_healthcheck_defaults_follow_transport_and_docker_health() -> None:
    udp = only_route({"proxy.dns.port": "53", "proxy.dns.scheme": "udp"})
    assert udp.options.healthcheck.kind == "none"  # a datagram proves nothing by itself
    healthy = dataclasses.replace(view({"proxy.ssh.port": "2222:22"}), health="healthy")
    [docker] = parse_container(healthy, CTX)[0]
    assert docker.options.healthcheck.kind == "docker"  # its HEALTHCHECK decides, as before


def test_a_bad_healthcheck_label_is_a_problem_naming_it() -> None:
    specs, problems = parse_container(
        view({"proxy.db.port": "6379", "proxy.db.healthcheck.rise": "often"}), CTX
    )
    assert specs == ()
    [problem] = problems
    assert (problem.label, problem.value) == ("proxy.db.healthcheck.rise", "often")
    specs, problems = parse_container(
        view({"proxy.dns.port": "53", "proxy.dns.scheme": "udp",
              "proxy.dns.healthcheck": "redis"}), CTX,
    )  # fmt: skip
    assert specs == ()
    assert [p.label for p in problems] == ["proxy.dns.healthcheck"]
