"""The `healthcheck` route fields -> a `HealthCheck` (pure: no I/O).

Fields (labels `proxy.<alias>.<field>` and the routes file alike):
`healthcheck` (`tcp`, `none`, `send_expect`, `docker` or a named probe: redis, dns, minecraft,
ssh, postgres, mqtt), `healthcheck.send`, `healthcheck.expect`, `healthcheck.interval` (5s),
`healthcheck.timeout` (2s, at most the interval), `healthcheck.rise` (2), `healthcheck.fall`
(3). `send`/`expect` are text with the escapes `\\r \\n \\t \\0 \\\\ \\xHH`, or `hex:` and hex
digits; `expect` may also be `re:` and a regular expression searched in the answer. A
`send`/`expect` without `healthcheck` means `send_expect`. GoDoxy's `healthcheck.disable`
(`disabled`) turns checks off; its HTTP-only `healthcheck.path`/`use_get` are ignored.

Defaults when `healthcheck` is not given: `docker` for a container with a Docker HEALTHCHECK
(its health decides, as today), else `tcp` for a TCP route and `none` for a UDP route (a
datagram proves nothing without an answer). Timing fields of `none`/`docker` are ignored.

Two steps, because a route's transport may only be known per port (the scheme defaults from
the container's exposed ports): `parse_health_fields` checks the syntax of whatever fields are
given, `resolve_health` applies the defaults rule and the transport rules. `parse_healthcheck`
does both. Problems are `(field, value, message)` tuples, for the caller to turn into
`spec.Problem`s naming the label; any problem fails the route (as in `fields`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from labelproxy.healthcheck import (
    DEFAULT_TIMEOUT,
    KINDS,
    MIN_INTERVAL,
    NAMED_PROBES,
    HealthCheck,
    Kind,
    Transport,
)
from labelproxy.units import parse_duration

logger = logging.getLogger(__name__)

FieldProblem = tuple[str, str, str]  # (field, value, message)

HEALTH_FIELDS = (
    "healthcheck", "healthcheck.send", "healthcheck.expect", "healthcheck.interval",
    "healthcheck.timeout", "healthcheck.rise", "healthcheck.fall",
)  # fmt: skip
GODOXY_DISABLE_FIELDS = ("healthcheck.disable", "healthcheck.disabled")
GODOXY_IGNORED_FIELDS = ("healthcheck.path", "healthcheck.use_get")
_ACCEPTED = frozenset(HEALTH_FIELDS + GODOXY_DISABLE_FIELDS + GODOXY_IGNORED_FIELDS)
_KIND_SYNONYMS: dict[str, Kind] = {"off": "none", "connect": "tcp"}
_UDP_PROBES = sorted(k for k, t in NAMED_PROBES.items() if "udp" in t)
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.|$)", re.DOTALL)
_SIMPLE_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\"}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_MAX_COUNT = 1000

T = TypeVar("T")


def owns_field(name: str) -> bool:
    """True for `healthcheck` and every `healthcheck.*` field: `fields.parse_route_fields`
    leaves these to this module (which reports unknown `healthcheck.*` names itself)."""
    return name == "healthcheck" or name.startswith("healthcheck.")


@dataclass(frozen=True, slots=True)
class HealthFields:
    """The `healthcheck` fields as given (syntax checked), before the defaults rule.
    `None` means "not given"; `given` keeps each field's text for problems."""

    kind: Kind | None = None
    send: bytes | None = None
    expect: bytes | None = None
    expect_regex: bool = False
    interval: float | None = None
    timeout: float | None = None
    rise: int | None = None
    fall: int | None = None
    disabled: bool = False
    given: Mapping[str, str] = field(default_factory=dict)


def parse_healthcheck(
    fields: Mapping[str, str], *, transport: Transport, docker_health: bool
) -> tuple[HealthCheck | None, tuple[FieldProblem, ...]]:
    """A route's check from its fields (any others are ignored); `None` with the problems
    when a field is wrong. `docker_health`: the container has a Docker HEALTHCHECK (always
    False for a routes-file route)."""
    parsed, problems = parse_health_fields(fields)
    if parsed is None:
        return None, problems
    return resolve_health(parsed, transport=transport, docker_health=docker_health)


def parse_health_fields(
    fields: Mapping[str, str],
) -> tuple[HealthFields | None, tuple[FieldProblem, ...]]:
    """The syntax of the `healthcheck*` fields in `fields`; `None` with problems if wrong."""
    ours = {name: text for name, text in fields.items() if owns_field(name)}
    problems: list[FieldProblem] = []

    def take(name: str, parser: Callable[[str], T]) -> T | None:
        if name not in ours:
            return None
        try:
            return parser(ours[name])
        except ValueError as exc:
            problems.append((name, ours[name], str(exc)))
            return None

    for name in sorted(set(ours) - _ACCEPTED):
        message = f"unknown field {name!r}; expected one of: {', '.join(HEALTH_FIELDS)}"
        problems.append((name, ours[name], message))
    for name in GODOXY_IGNORED_FIELDS:
        if name in ours:
            logger.debug("ignoring GoDoxy HTTP health field %s", name)
    expect = take("healthcheck.expect", parse_expect)
    disabled = [take(name, parse_bool) for name in GODOXY_DISABLE_FIELDS]
    parsed = HealthFields(
        kind=take("healthcheck", parse_kind),
        send=take("healthcheck.send", parse_payload),
        expect=expect[0] if expect else None,
        expect_regex=expect[1] if expect else False,
        interval=take("healthcheck.interval", parse_interval),
        timeout=take("healthcheck.timeout", parse_timeout),
        rise=take("healthcheck.rise", parse_count),
        fall=take("healthcheck.fall", parse_count),
        disabled=any(disabled),
        given=ours,
    )
    if problems:
        return None, tuple(problems)
    return parsed, ()


def resolve_health(
    parsed: HealthFields, *, transport: Transport, docker_health: bool
) -> tuple[HealthCheck | None, tuple[FieldProblem, ...]]:
    """The check a route of `transport` gets from `parsed`: the defaults rule, then the
    rules that tie the kind to the transport and to `send`/`expect`."""
    given = parsed.given
    explicit = parsed.kind
    payload = parsed.send is not None or parsed.expect is not None
    if parsed.disabled:
        if explicit not in (None, "none"):
            name = next(n for n in GODOXY_DISABLE_FIELDS if n in given)
            return None, ((name, given[name], f"conflicts with healthcheck={explicit}"),)
        explicit = "none"
    kind: Kind
    if explicit is not None:
        kind = explicit
    elif payload:
        kind = "send_expect"
    elif docker_health:
        kind = "docker"
    else:
        kind = "tcp" if transport == "tcp" else "none"
    problem = _kind_problem(parsed, kind, transport=transport, docker_health=docker_health)
    if problem is not None:
        return None, (problem,)
    if kind in ("none", "docker"):
        return HealthCheck(kind), ()
    check = HealthCheck(
        kind,
        send=parsed.send or b"",
        expect=parsed.expect or b"",
        expect_regex=parsed.expect_regex,
    )
    if parsed.interval is not None:
        check = replace(check, interval=parsed.interval)
    if parsed.timeout is not None:
        if parsed.interval is not None and parsed.timeout > parsed.interval:
            text = given["healthcheck.interval"]
            message = f"expected a timeout no longer than healthcheck.interval ({text})"
            return None, (("healthcheck.timeout", given["healthcheck.timeout"], message),)
        check = replace(check, timeout=parsed.timeout)
    else:
        check = replace(check, timeout=min(DEFAULT_TIMEOUT, check.interval))
    if parsed.rise is not None:
        check = replace(check, rise=parsed.rise)
    if parsed.fall is not None:
        check = replace(check, fall=parsed.fall)
    return check, ()


def _kind_problem(
    parsed: HealthFields, kind: Kind, *, transport: Transport, docker_health: bool
) -> FieldProblem | None:
    given = parsed.given
    text = given.get("healthcheck", kind)
    if kind == "docker" and not docker_health:
        return ("healthcheck", text, "expected a container with a Docker HEALTHCHECK; "
                "this route has none (use tcp, a named probe or none)")  # fmt: skip
    if transport == "udp" and kind == "tcp":
        return ("healthcheck", text, "a UDP route cannot be checked by a TCP connect; use "
                f"send_expect with healthcheck.send and healthcheck.expect, or "
                f"{', '.join(_UDP_PROBES)}")  # fmt: skip
    if kind in NAMED_PROBES and transport not in NAMED_PROBES[kind]:
        speaks = "/".join(sorted(NAMED_PROBES[kind])).upper()
        message = (
            f"the {kind} probe speaks {speaks}; this route is {transport.upper()} "
            f"(UDP probes: {', '.join(_UDP_PROBES)}, send_expect)"
        )
        return "healthcheck", text, message
    if kind != "send_expect":
        for name in ("healthcheck.send", "healthcheck.expect"):
            if name in given:
                message = f"applies only to healthcheck=send_expect (healthcheck is {kind})"
                return name, given[name], message
        return None
    if parsed.expect is None:
        return ("healthcheck.expect", "", "healthcheck=send_expect needs healthcheck.expect: "
                "the answer (text, hex:..., or re:...) that means the backend is up")  # fmt: skip
    if transport == "udp" and parsed.send is None:
        return ("healthcheck.send", "", "a UDP check must send a datagram to get an answer: "
                "set healthcheck.send")  # fmt: skip
    return None


def parse_kind(text: str) -> Kind:
    value = text.strip().lower()
    if value in _KIND_SYNONYMS:
        return _KIND_SYNONYMS[value]
    for kind in KINDS:
        if kind == value:
            return kind
    raise ValueError(f"expected one of {', '.join(KINDS)}")


def parse_payload(text: str) -> bytes:
    """`hex:0d0a` or text with the escapes `\\r \\n \\t \\0 \\\\ \\xHH` -> the bytes."""
    if text.startswith("hex:"):
        digits = "".join(text[4:].split())
        try:
            data = bytes.fromhex(digits)
        except ValueError:
            raise ValueError(
                "expected hex: followed by pairs of hex digits, such as hex:0d0a"
            ) from None
    else:
        data = decode_escapes(text)
    if not data:
        raise ValueError("expected at least one byte (leave the field out for none)")
    return data


def parse_expect(text: str) -> tuple[bytes, bool]:
    """(pattern, is_regex): `re:<regex>`, or a payload as `parse_payload` reads it."""
    if text.startswith("re:"):
        pattern = text[3:].encode("utf-8")
        if not pattern:
            raise ValueError("expected a regular expression after re:")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"expected a regular expression after re: ({exc})") from None
        return pattern, True
    return parse_payload(text), False


def decode_escapes(text: str) -> bytes:
    """UTF-8 bytes of `text` with `\\r \\n \\t \\0 \\\\ \\xHH` replaced."""
    out = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(text):
        out += text[pos : match.start()].encode("utf-8")
        code = match.group(1)
        if code.startswith("x") and len(code) == 3:
            out.append(int(code[1:], 16))
        elif code in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[code]
        else:
            raise ValueError(
                f"unknown escape \\{code}; expected \\r \\n \\t \\0 \\\\ or \\xHH (or use hex:)"
            )
        pos = match.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


def parse_interval(text: str) -> float:
    seconds = round(parse_duration(text), 6)  # 700ms is 0.7, not 0.7000000000000001
    if seconds < MIN_INTERVAL:
        raise ValueError("expected an interval of at least 50ms, such as 5s or 1m")
    return seconds


def parse_timeout(text: str) -> float:
    seconds = round(parse_duration(text), 6)
    if seconds <= 0:
        raise ValueError("expected a positive duration such as 2s or 500ms")
    return seconds


def parse_count(text: str) -> int:
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= _MAX_COUNT:
        raise ValueError(f"expected a whole number from 1 to {_MAX_COUNT}, such as 3")
    return int(value)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true or false (also 1/0, yes/no)")
