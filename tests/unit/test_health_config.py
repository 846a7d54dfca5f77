"""Table tests for the `healthcheck*` route fields (health/config.py) and the check model."""

from __future__ import annotations

import pytest

from labelproxy.health.config import (
    HEALTH_FIELDS,
    decode_escapes,
    owns_field,
    parse_health_fields,
    parse_healthcheck,
)
from labelproxy.healthcheck import HealthCheck, Transport

TCP = HealthCheck("tcp")


def parse(
    fields: dict[str, str], *, transport: Transport = "tcp", docker: bool = False
) -> HealthCheck | None:
    check, problems = parse_healthcheck(fields, transport=transport, docker_health=docker)
    assert problems == (), problems
    return check


@pytest.mark.parametrize(
    ("fields", "transport", "docker", "expected"),
    [
        # the defaults rule
        ({}, "tcp", False, TCP),
        ({}, "udp", False, HealthCheck("none")),
        ({}, "tcp", True, HealthCheck("docker")),
        ({}, "udp", True, HealthCheck("docker")),
        ({"port": "80", "allow": "10.0.0.0/8"}, "tcp", False, TCP),  # other fields: not ours
        # explicit kinds
        ({"healthcheck": "none"}, "tcp", False, HealthCheck("none")),
        ({"healthcheck": " OFF "}, "tcp", True, HealthCheck("none")),
        ({"healthcheck": "tcp"}, "tcp", True, TCP),  # an active check beside Docker's
        ({"healthcheck": "docker"}, "tcp", True, HealthCheck("docker")),
        ({"healthcheck": "redis"}, "tcp", False, HealthCheck("redis")),
        ({"healthcheck": "dns"}, "udp", False, HealthCheck("dns")),
        ({"healthcheck": "dns"}, "tcp", False, HealthCheck("dns")),
        ({"healthcheck": "minecraft"}, "tcp", False, HealthCheck("minecraft")),
        ({"healthcheck": "ssh"}, "tcp", False, HealthCheck("ssh")),
        ({"healthcheck": "postgres"}, "tcp", False, HealthCheck("postgres")),
        ({"healthcheck": "mqtt"}, "tcp", False, HealthCheck("mqtt")),
        # send/expect, with and without the kind
        ({"healthcheck.send": "PING\\r\\n", "healthcheck.expect": "+PONG"}, "tcp", False,
         HealthCheck("send_expect", send=b"PING\r\n", expect=b"+PONG")),
        ({"healthcheck": "send_expect", "healthcheck.expect": "SSH-2.0"}, "tcp", False,
         HealthCheck("send_expect", expect=b"SSH-2.0")),
        ({"healthcheck.send": "hex:00 01 ff", "healthcheck.expect": "re:^OK\\s\\d+$"}, "udp",
         False, HealthCheck("send_expect", send=b"\x00\x01\xff", expect=rb"^OK\s\d+$",
                            expect_regex=True)),
        ({"healthcheck.send": "x", "healthcheck.expect": "hex:0A"}, "udp", True,
         HealthCheck("send_expect", send=b"x", expect=b"\n")),
        # timing and thresholds
        ({"healthcheck.interval": "10s", "healthcheck.timeout": "3s", "healthcheck.rise": "1",
          "healthcheck.fall": "5"}, "tcp", False,
         HealthCheck("tcp", interval=10.0, timeout=3.0, rise=1, fall=5)),
        ({"healthcheck.interval": "1s"}, "tcp", False,  # the 2s default timeout is capped
         HealthCheck("tcp", interval=1.0, timeout=1.0)),
        ({"healthcheck.interval": "100ms", "healthcheck.timeout": "100ms"}, "tcp", False,
         HealthCheck("tcp", interval=0.1, timeout=0.1)),
        # ignored: timing without an active check, GoDoxy's HTTP-only fields
        ({"healthcheck.interval": "1m"}, "udp", False, HealthCheck("none")),
        ({"healthcheck": "none", "healthcheck.rise": "9"}, "tcp", False, HealthCheck("none")),
        ({"healthcheck.interval": "1m"}, "tcp", True, HealthCheck("docker")),
        ({"healthcheck.path": "/ping", "healthcheck.use_get": "true"}, "tcp", False, TCP),
        ({"healthcheck.disable": "true"}, "tcp", False, HealthCheck("none")),
        ({"healthcheck.disabled": "yes"}, "tcp", True, HealthCheck("none")),
        ({"healthcheck.disable": "false"}, "tcp", False, TCP),
    ],
)  # fmt: skip
def test_valid_fields(
    fields: dict[str, str], transport: Transport, docker: bool, expected: HealthCheck
) -> None:
    assert parse(fields, transport=transport, docker=docker) == expected


@pytest.mark.parametrize(
    ("fields", "transport", "docker", "problem"),
    [
        ({"healthcheck": "http"}, "tcp", False,
         ("healthcheck", "http", "expected one of none, docker, tcp, send_expect, redis, dns, "
          "minecraft, ssh, postgres, mqtt")),
        ({"healthcheck": "tcp"}, "udp", False,
         ("healthcheck", "tcp", "a UDP route cannot be checked by a TCP connect; use "
          "send_expect with healthcheck.send and healthcheck.expect, or dns")),
        ({"healthcheck": "redis"}, "udp", False,
         ("healthcheck", "redis", "the redis probe speaks TCP; this route is UDP "
          "(UDP probes: dns, send_expect)")),
        ({"healthcheck": "docker"}, "tcp", False,
         ("healthcheck", "docker", "expected a container with a Docker HEALTHCHECK; this "
          "route has none (use tcp, a named probe or none)")),
        ({"healthcheck": "send_expect"}, "tcp", False,
         ("healthcheck.expect", "", "healthcheck=send_expect needs healthcheck.expect: the "
          "answer (text, hex:..., or re:...) that means the backend is up")),
        ({"healthcheck.expect": "pong"}, "udp", False,
         ("healthcheck.send", "", "a UDP check must send a datagram to get an answer: set "
          "healthcheck.send")),
        ({"healthcheck": "redis", "healthcheck.send": "PING"}, "tcp", False,
         ("healthcheck.send", "PING",
          "applies only to healthcheck=send_expect (healthcheck is redis)")),
        ({"healthcheck": "tcp", "healthcheck.disable": "true"}, "tcp", False,
         ("healthcheck.disable", "true", "conflicts with healthcheck=tcp")),
        ({"healthcheck.interval": "1s", "healthcheck.timeout": "2s"}, "tcp", False,
         ("healthcheck.timeout", "2s",
          "expected a timeout no longer than healthcheck.interval (1s)")),
        ({"healthcheck.interval": "10ms"}, "tcp", False,
         ("healthcheck.interval", "10ms", "expected an interval of at least 50ms, such as 5s "
          "or 1m")),
        ({"healthcheck.interval": "soon"}, "tcp", False,
         ("healthcheck.interval", "soon", "expected a duration such as 90s, 5m or 1h30m, got "
          "'soon'")),
        ({"healthcheck.timeout": "0s"}, "tcp", False,
         ("healthcheck.timeout", "0s", "expected a positive duration such as 2s or 500ms")),
        ({"healthcheck.rise": "0"}, "tcp", False,
         ("healthcheck.rise", "0", "expected a whole number from 1 to 1000, such as 3")),
        ({"healthcheck.fall": "three"}, "tcp", False,
         ("healthcheck.fall", "three", "expected a whole number from 1 to 1000, such as 3")),
        ({"healthcheck.send": "hex:0g", "healthcheck.expect": "x"}, "tcp", False,
         ("healthcheck.send", "hex:0g", "expected hex: followed by pairs of hex digits, such "
          "as hex:0d0a")),
        ({"healthcheck.send": "a\\qb", "healthcheck.expect": "x"}, "tcp", False,
         ("healthcheck.send", "a\\qb", "unknown escape \\q; expected \\r \\n \\t \\0 \\\\ or "
          "\\xHH (or use hex:)")),
        ({"healthcheck.expect": "re:(unclosed"}, "tcp", False,
         ("healthcheck.expect", "re:(unclosed", "expected a regular expression after re: "
          "(missing ), unterminated subpattern at position 0)")),
        ({"healthcheck.expect": ""}, "tcp", False,
         ("healthcheck.expect", "", "expected at least one byte (leave the field out for "
          "none)")),
        ({"healthcheck.retries": "3"}, "tcp", False,
         ("healthcheck.retries", "3", "unknown field 'healthcheck.retries'; expected one of: "
          + ", ".join(HEALTH_FIELDS))),
        ({"healthcheck.disable": "maybe"}, "tcp", False,
         ("healthcheck.disable", "maybe", "expected true or false (also 1/0, yes/no)")),
    ],
)  # fmt: skip
def test_invalid_fields(
    fields: dict[str, str], transport: Transport, docker: bool, problem: tuple[str, str, str]
) -> None:
    check, problems = parse_healthcheck(fields, transport=transport, docker_health=docker)
    assert check is None
    assert problems == (problem,)


def test_every_syntax_problem_is_reported_at_once() -> None:
    fields = {"healthcheck": "ping", "healthcheck.rise": "-1", "healthcheck.timeout": "x"}
    parsed, problems = parse_health_fields(fields)
    assert parsed is None
    assert [p[0] for p in problems] == ["healthcheck", "healthcheck.timeout", "healthcheck.rise"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PING\\r\\n", b"PING\r\n"),
        ("a\\tb\\\\c\\0", b"a\tb\\c\0"),
        ("\\x00\\xFFz", b"\x00\xffz"),
        ("héllo", "héllo".encode()),
        ("no escapes", b"no escapes"),
    ],
)
def test_escapes(text: str, expected: bytes) -> None:
    assert decode_escapes(text) == expected


def test_owns_field() -> None:
    assert owns_field("healthcheck")
    assert owns_field("healthcheck.anything")
    assert not owns_field("healthchecks")
    assert not owns_field("port")


@pytest.mark.parametrize(
    "check",
    [
        HealthCheck("tcp"),
        HealthCheck("none"),
        HealthCheck("docker"),
        HealthCheck("dns", interval=0.25, timeout=0.1, rise=1, fall=1),
        HealthCheck("send_expect", send=b"PING\r\n", expect=b"+PONG", interval=90.0),
        HealthCheck("send_expect", send=b"\x00\x01\xfe", expect=b"re:x"),
        HealthCheck("send_expect", expect=rb"^SSH-2\.0-\S+", expect_regex=True),
        HealthCheck("redis", interval=1.5, timeout=0.7),
        HealthCheck("ssh", interval=0.05, timeout=0.001),
    ],
)
def test_to_fields_parses_back(check: HealthCheck) -> None:
    transport: Transport = "udp" if check.kind == "dns" else "tcp"
    assert parse(check.to_fields(), transport=transport, docker=True) == check


def test_checks_are_hashable_values() -> None:
    a = HealthCheck("send_expect", send=b"x", expect=b"y")
    b = parse({"healthcheck.send": "x", "healthcheck.expect": "y"})
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, TCP}) == 2


@pytest.mark.parametrize(
    ("check", "answer", "matches"),
    [
        (HealthCheck("send_expect", expect=b"PONG"), b"+PONG\r\n", True),
        (HealthCheck("send_expect", expect=b"PONG"), b"-ERR\r\n", False),
        (HealthCheck("send_expect", expect=rb"^\+PONG\r$", expect_regex=True), b"+PONG\r", True),
        (HealthCheck("send_expect", expect=rb"^\+PONG$", expect_regex=True), b" +PONG", False),
        (HealthCheck("send_expect", expect=rb"(?i)ready", expect_regex=True), b"READY", True),
    ],
)
def test_matches(check: HealthCheck, answer: bytes, matches: bool) -> None:
    assert check.matches(answer) is matches


def test_str_names_the_check() -> None:
    assert str(HealthCheck("none")) == "none"
    assert str(HealthCheck("tcp")) == "tcp interval=5s timeout=2s rise=2 fall=3"
    text = str(HealthCheck("send_expect", send=b"PING\r\n", expect=b"+PONG", interval=0.5))
    assert text == "send_expect send=PING\\r\\n expect=+PONG interval=0.5s timeout=2s rise=2 fall=3"
