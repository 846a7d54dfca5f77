"""Table tests for the static routes file (routesfile.py), read from real files."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from labelproxy.healthcheck import HealthCheck
from labelproxy.sources.routesfile import RoutesFileError, keep_last_good, load_routes_file
from labelproxy.spec import Backend, ListenKey, Problem, RouteOptions, RouteSpec


def load(tmp_path: Path, text: str) -> tuple[tuple[RouteSpec, ...], tuple[Problem, ...], Path]:
    path = tmp_path / "routes.yml"
    path.write_text(text, encoding="utf-8")
    specs, problems = load_routes_file(path)
    return specs, problems, path


def test_design_example(tmp_path: Path) -> None:
    specs, problems, path = load(
        tmp_path,
        """
routes:
  ssh-proxy:
    scheme: tcp4
    bind: 0.0.0.0
    port: 2222:22
    host: 10.0.0.5        # required here: there is no container
""",
    )
    assert problems == ()
    assert specs == (
        RouteSpec(
            alias="ssh-proxy",
            scheme="tcp4",
            key=ListenKey("tcp", "0.0.0.0", 2222),
            backends=(Backend("10.0.0.5", 22),),
            options=RouteOptions(healthcheck=HealthCheck("tcp")),
            source=str(path),
        ),
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("port: 53\n    scheme: udp\n    host: 10.0.0.53",
         [("udp", 53, ["10.0.0.53:53"])]),
        ("port: '8000-8001:9000-9001'\n    host: app.lan",
         [("tcp", 8000, ["app.lan:9000"]), ("tcp", 8001, ["app.lan:9001"])]),
        ("port: 5432\n    host: [10.0.0.2, '10.0.0.1', 'db3.lan:6432']",
         [("tcp", 5432, ["10.0.0.1:5432", "10.0.0.2:5432", "db3.lan:6432"])]),
        ("port: 5432\n    hosts:\n      - '[fd00::1]:5433'\n      - fd00::2",
         [("tcp", 5432, ["[fd00::1]:5433", "[fd00::2]:5432"])]),
        ("port: 5432\n    host: 10.0.0.1:6000, 10.0.0.1:6000, 10.0.0.2",
         [("tcp", 5432, ["10.0.0.1:6000", "10.0.0.2:5432"])]),
        ("port: 7000-7001\n    hosts: [a.lan, b.lan]",
         [("tcp", 7000, ["a.lan:7000", "b.lan:7000"]),
          ("tcp", 7001, ["a.lan:7001", "b.lan:7001"])]),
    ],
)  # fmt: skip
def test_good_routes(tmp_path: Path, body: str, expected: list[tuple[str, int, list[str]]]) -> None:
    specs, problems, _ = load(tmp_path, f"routes:\n  r:\n    {body}\n")
    assert problems == ()
    assert [(s.transport, s.key.port, [str(b) for b in s.backends]) for s in specs] == expected


def test_options_use_the_label_syntax(tmp_path: Path) -> None:
    specs, problems, _ = load(
        tmp_path,
        """
routes:
  db:
    port: 5432
    host: 10.0.0.2
    proxy_protocol: v2
    allow: [10.0.0.0/8, "::1"]
    deny: 10.9.0.0/16
    max_connections: 100
    idle_timeout: 5m
    connect_timeout: 2s
    load_balance: least_conn
    forwarding: relay
""",
    )
    assert problems == ()
    [spec] = specs
    assert spec.options == RouteOptions(
        proxy_protocol="v2",
        allow=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")),
        deny=(ipaddress.ip_network("10.9.0.0/16"),),
        max_connections=100,
        idle_timeout=300.0,
        connect_timeout=2.0,
        load_balance="least_conn",
        forwarding="relay",
        healthcheck=HealthCheck("tcp"),
    )


@pytest.mark.parametrize(
    ("body", "label", "value", "expected"),
    [
        ("port: 22", "routes.bad.host", "", "host is required"),
        ("port: 22\n    host: ''", "routes.bad.host", "", "expected HOST"),
        ("port: 22\n    host: a\n    hosts: [b]", "routes.bad.hosts", "[b]", "not both"),
        ("port: 22\n    host: 'db:99999'", "routes.bad.host", "db:99999", "1-65535"),
        ("port: 22\n    host: [ok.lan, 'b@d']", "routes.bad.host", "b@d", "host name"),
        ("port: 22\n    host: [{a: 1}]", "routes.bad.host", "{a: '1'}", "HOST:PORT"),
        ("port: 22-23\n    host: 'a.lan:22'", "routes.bad.host", "a.lan:22", "port range"),
        ("host: a.lan", "routes.bad.port", "", "port is required"),
        ("port: 70000\n    host: a.lan", "routes.bad.port", "70000", "1-65535"),
        ("port: 22\n    host: a.lan\n    scheme: quic", "routes.bad.scheme", "quic", "udp6"),
        ("port: 22\n    host: a.lan\n    scheme: tcp6\n    bind: 0.0.0.0", "routes.bad.bind",
         "0.0.0.0", "IPv6"),
        ("port: 22\n    host: a.lan\n    scheme: udp\n    proxy_protocol: v1",
         "routes.bad.proxy_protocol", "v1", "expected v2"),
        ("port: 22\n    host: a.lan\n    allow: [nope]", "routes.bad.allow", "nope", "CIDR"),
        ("port: 22\n    host: a.lan\n    max_connections: 0", "routes.bad.max_connections", "0",
         "positive"),
        ("port: 22\n    host: a.lan\n    idle_timeout: soon", "routes.bad.idle_timeout", "soon",
         "duration"),
        ("port: 22\n    host: a.lan\n    idle_timeout: nan", "routes.bad.idle_timeout", "nan",
         "duration"),
        ("port: 22\n    host: a.lan\n    idle_timeout: .inf", "routes.bad.idle_timeout", ".inf",
         "duration"),
        ("port: 22\n    host: a.lan\n    connect_timeout: 1e400", "routes.bad.connect_timeout",
         "1e400", "duration"),
        ("port: 22\n    host: a.lan\n    connect_timeout: 0", "routes.bad.connect_timeout", "0",
         "positive duration"),
        ("port: 53/udp\n    host: a.lan", "routes.bad.port", "53/udp",
         "use port 53 with scheme udp"),
        ("port: 22\n    host: a.lan\n    load_balance: [a]", "routes.bad.load_balance", "[a]",
         "single value"),
        ("port: 22\n    host: a.lan\n    forwarding: fast", "routes.bad.forwarding", "fast",
         "auto, relay"),
        ("port: 22\n    host: a.lan\n    middlewares: x", "routes.bad.middlewares", "x",
         "unknown field"),
    ],
)  # fmt: skip
def test_bad_route_is_a_problem_and_spares_the_others(
    tmp_path: Path, body: str, label: str, value: str, expected: str
) -> None:
    text = f"routes:\n  bad:\n    {body}\n  good:\n    port: 2222\n    host: 10.0.0.1\n"
    specs, problems, path = load(tmp_path, text)
    assert [s.alias for s in specs] == ["good"]
    [problem] = problems
    assert problem.kind == "label"
    assert problem.route == "bad"
    assert problem.source == str(path)
    assert (problem.label, problem.value) == (label, value)
    assert expected in problem.message
    assert str(path) in str(problem)
    assert label in str(problem)


def test_route_that_is_not_a_mapping(tmp_path: Path) -> None:
    specs, problems, _ = load(tmp_path, "routes:\n  bad: 2222:22\n")
    assert specs == ()
    [problem] = problems
    assert (problem.label, problem.value) == ("routes.bad", "2222:22")


def test_unknown_top_level_key_is_a_problem(tmp_path: Path) -> None:
    specs, problems, _ = load(tmp_path, "route: {}\nroutes:\n  a: {port: 1, host: h}\n")
    assert [s.alias for s in specs] == ["a"]
    [problem] = problems
    assert problem.label == "route"


@pytest.mark.parametrize("text", ["routes:\n", "routes: {}\n"])
def test_no_routes(tmp_path: Path, text: str) -> None:
    assert load(tmp_path, text)[:2] == ((), ())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "expected a YAML mapping with a routes: key"),
        ("- a\n- b\n", "expected a YAML mapping with a routes: key"),
        ("ssh:\n  port: 22\n", "expected a YAML mapping with a routes: key"),
        ("routes: [a, b]\n", "mapping of route name -> fields"),
        ("routes:\n  a: {port: 1\n", "not valid YAML"),
        ("routes:\n\tbad: tab\n", "not valid YAML"),
    ],
)
def test_unusable_file(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(RoutesFileError) as caught:
        load(tmp_path, text)
    assert expected in str(caught.value)
    assert str(tmp_path / "routes.yml") in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yml"
    with pytest.raises(RoutesFileError, match="No such file") as caught:
        load_routes_file(path)
    assert str(path) in str(caught.value)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "routes.yml"
    path.write_bytes(b"routes:\n  a: {port: 1, host: \xff}\n")
    with pytest.raises(RoutesFileError) as caught:
        load_routes_file(path)
    assert str(path) in str(caught.value)


def test_keep_last_good_keeps_broken_routes_and_drops_removed_ones() -> None:
    source = "/etc/routes.yaml"

    def spec(name: str, port: int) -> RouteSpec:
        return RouteSpec(name, "tcp", ListenKey("tcp", "::", port), (Backend("h", 1),),
                         source=source)  # fmt: skip

    def bad(name: str) -> Problem:
        return Problem("label", name, source, f"routes.{name}.scheme", "udpp", "expected tcp")

    previous = {"a": (spec("a", 1),), "b": (spec("b", 2),), "gone": (spec("gone", 3),)}
    file_level = Problem("label", "", source, "rotes", "", "unknown key; expected routes:")
    merged = keep_last_good(
        previous, [spec("b", 20), spec("c", 4)], [bad("a"), bad("new"), file_level]
    )
    assert merged.by_name == {"a": (spec("a", 1),), "b": (spec("b", 20),), "c": (spec("c", 4),)}
    assert merged.specs == (spec("a", 1), spec("b", 20), spec("c", 4))
    assert merged.kept == ("a",)
    assert [p.message for p in merged.problems] == [
        "expected tcp; still serving its last good version",
        "expected tcp",
        "unknown key; expected routes:",
    ]
    # broken again: the kept version is kept again; fixed: the new version replaces it
    again = keep_last_good(merged.by_name, [], [bad("a")])
    assert again.by_name == {"a": (spec("a", 1),)}
    fixed = keep_last_good(again.by_name, [spec("a", 10)], [])
    assert (fixed.by_name, fixed.problems, fixed.kept) == ({"a": (spec("a", 10),)}, (), ())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("'" + "r" * 65 + "'", "it has 65 characters", id="65 characters"),
        pytest.param("'my route'", "' ' is not allowed", id="space"),
        pytest.param("'db/primary'", "'/' is not allowed", id="slash"),
        pytest.param("'caf\u00e9'", "'\u00e9' is not allowed", id="not ascii"),
        pytest.param("'a\"b'", "'\"' is not allowed", id="quote"),
    ],
)
def test_route_name_out_of_bounds_is_a_problem(tmp_path: Path, name: str, expected: str) -> None:
    """A route name is the `route` label of its series: bounded like an alias."""
    text = f"routes:\n  {name}:\n    port: 22\n    host: a.lan\n  good:\n    port: 2222\n"
    text += "    host: 10.0.0.1\n"
    specs, problems, path = load(tmp_path, text)
    assert [s.alias for s in specs] == ["good"]
    [problem] = problems
    assert (problem.kind, problem.route, problem.label) == ("label", "", "routes")
    assert problem.value == name.strip("'")
    assert "route name of at most 64 characters" in problem.message
    assert expected in problem.message
    assert str(path) in str(problem)


@pytest.mark.parametrize("name", ["r" * 64, "ssh-proxy", "Web_2.internal", "0"])
def test_route_names_within_the_bounds(tmp_path: Path, name: str) -> None:
    specs, problems, _ = load(tmp_path, f"routes:\n  '{name}':\n    port: 22\n    host: a.lan\n")
    assert problems == ()
    assert [s.alias for s in specs] == [name]


def test_healthcheck_fields_in_the_routes_file(tmp_path: Path) -> None:
    specs, problems, _ = load(
        tmp_path,
        """
routes:
  cache:
    port: 6379
    host: 127.0.0.1
    healthcheck: send_expect
    healthcheck.send: "PING\\r\\n"
    healthcheck.expect: "+PONG"
    healthcheck.fall: 2
  bad:
    port: 6380
    host: 127.0.0.1
    healthcheck.interval: soon
""",
    )
    [spec] = specs
    check = spec.options.healthcheck
    assert (check.kind, check.send, check.expect, check.fall) == (
        "send_expect", b"PING\r\n", b"+PONG", 2,
    )  # fmt: skip
    [problem] = problems
    assert (problem.route, problem.label, problem.value) == (
        "bad", "routes.bad.healthcheck.interval", "soon",
    )  # fmt: skip
