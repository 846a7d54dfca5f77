"""The syntax of a route's fields, shared by container labels and the routes file.

`parse_route_fields` validates one route's `field -> text` mapping (port, scheme, bind, host,
proxy_protocol, allow, deny, max_connections, idle_timeout, connect_timeout, load_balance,
forwarding, hostnames, and the `healthcheck*` fields, whose syntax `health.config` checks) into a
`RouteFields`, or returns the problems, each naming the label (via `label_of`), the value and
what was expected. Any bad or unknown field fails the route: serving it with the field dropped
could silently widen access (`allow`) or change its meaning. Defaults that depend on the
container (the scheme from exposed ports, the check from the transport and a Docker
HEALTHCHECK: `route_options`) and target resolution are left to the callers.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

from labelproxy.health.config import HealthFields, owns_field, parse_health_fields, resolve_health
from labelproxy.healthcheck import Transport as HealthTransport
from labelproxy.spec import (
    LOAD_BALANCERS,
    ROUTE_FORWARDINGS,
    SCHEMES,
    LoadBalance,
    Problem,
    ProxyProtocolVersion,
    RouteForwarding,
    RouteOptions,
    Scheme,
    family_of,
    transport_of,
)
from labelproxy.units import parse_cidr_list, parse_positive_duration

logger = logging.getLogger(__name__)

FIELDS = (
    "port", "scheme", "bind", "host", "proxy_protocol", "allow", "deny", "max_connections",
    "idle_timeout", "connect_timeout", "load_balance", "forwarding", "hostnames",
)  # fmt: skip
HTTP_SCHEMES = frozenset({"http", "https", "h2c", "fileserver"})
# An alias is a label value of every per-route series and a word in every log line about it:
# bounded in length and alphabet, like a Docker or compose name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`)
MAX_ALIAS_CHARS = 64
ALIAS_SYNTAX = (
    f"a route name of at most {MAX_ALIAS_CHARS} characters, each a letter, digit, '_', '.' or '-'"
)
_ALIAS = re.compile(r"[A-Za-z0-9_.-]+")
PORT_SYNTAX = "LISTEN:TARGET, LISTEN, or ranges A-B:C-D of equal length, ports 1-65535"

_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?",
    re.IGNORECASE,
)
_PROTOCOL_SUFFIX = re.compile(r"\s*/\s*(tcp|udp)\b", re.IGNORECASE)
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PortMap:
    """One listen port and the target port it relays to."""

    listen: int
    target: int


@dataclass(frozen=True, slots=True)
class RouteFields:
    """A route's validated fields. `scheme`, `bind`, `host` are None when not given."""

    alias: str
    ports: tuple[PortMap, ...]
    scheme: Scheme | None = None
    bind: str | None = None
    host: str | None = None
    options: RouteOptions = field(default_factory=RouteOptions)
    health: HealthFields = field(default_factory=HealthFields)
    hostnames: tuple[str, ...] = ()  # normalized (`parse_hostnames`); () for a plain route


def parse_route_fields(
    alias: str,
    fields: Mapping[str, str],
    *,
    source: str,
    label_of: Callable[[str], str],
) -> tuple[RouteFields | None, tuple[Problem, ...]]:
    """Validate one route's fields; `None` (with the problems) when any field is wrong."""
    problems: list[Problem] = []

    def take(name: str, parser: Callable[[str], T]) -> T | None:
        if name not in fields:
            return None
        try:
            return parser(fields[name])
        except ValueError as exc:
            problems.append(Problem("label", alias, source, label_of(name), fields[name], str(exc)))
            return None

    for name in sorted(n for n in set(fields) - set(FIELDS) if not owns_field(n)):
        message = f"unknown field {name!r}; expected one of: {', '.join(FIELDS)}"
        problems.append(Problem("label", alias, source, label_of(name), fields[name], message))
    if "port" not in fields:
        message = f"port is required: {PORT_SYNTAX}"
        problems.append(Problem("label", alias, source, label_of("port"), "", message))
    ports = take("port", parse_ports)
    scheme = take("scheme", parse_scheme)
    bind = take("bind", parse_ip)
    host = take("host", parse_host)
    proxy_protocol = take("proxy_protocol", parse_proxy_protocol)
    options = RouteOptions(
        proxy_protocol=proxy_protocol or None,
        allow=take("allow", parse_cidr_list) or (),
        deny=take("deny", parse_cidr_list) or (),
        max_connections=take("max_connections", parse_positive_int),
        idle_timeout=take("idle_timeout", parse_positive_duration),
        connect_timeout=take("connect_timeout", parse_positive_duration),
        load_balance=take("load_balance", parse_load_balance) or "round_robin",
        forwarding=take("forwarding", parse_forwarding) or "auto",
    )
    hostnames = take("hostnames", parse_hostnames) or ()
    health, health_problems = parse_health_fields(fields)
    for name, value, message in health_problems:
        problems.append(Problem("label", alias, source, label_of(name), value, message))
    if problems or ports is None or health is None:
        return None, tuple(problems)
    route = RouteFields(alias, ports, scheme, bind, host, options, health, hostnames)
    if scheme is not None:
        bad = scheme_problem(route, scheme)
        if bad is not None:
            name, message = bad
            problem = Problem("label", alias, source, label_of(name), fields[name], message)
            return None, (problem,)
    return route, ()


def route_options(
    route: RouteFields,
    transport: HealthTransport,
    *,
    docker_health: bool,
    source: str,
    label_of: Callable[[str], str],
) -> tuple[RouteOptions | None, Problem | None]:
    """The options of `route` served over `transport`: its `healthcheck` resolved by the
    health package's defaults rule (`docker_health`: the container has a HEALTHCHECK)."""
    check, problems = resolve_health(route.health, transport=transport, docker_health=docker_health)
    if check is None:
        name, value, message = problems[0]
        return None, Problem("label", route.alias, source, label_of(name), value, message)
    return replace(route.options, healthcheck=check), None


def alias_problem(alias: str) -> str | None:
    """What is wrong with `alias` as a route name (see `ALIAS_SYNTAX`), or None."""
    if len(alias) > MAX_ALIAS_CHARS:
        return f"expected {ALIAS_SYNTAX}; it has {len(alias)} characters"
    bad = next((c for c in alias if not _ALIAS.fullmatch(c)), None)
    if bad is not None:
        return f"expected {ALIAS_SYNTAX}; {bad!r} is not allowed"
    return None


def scheme_problem(route: RouteFields, scheme: Scheme) -> tuple[str, str] | None:
    """(field, message) when `bind` or `proxy_protocol` cannot go with `scheme`."""
    family = family_of(scheme)
    if route.bind is not None and family != "dual":
        version = ipaddress.ip_address(route.bind).version
        if (family == "ipv4") != (version == 4):
            wanted = "IPv4" if family == "ipv4" else "IPv6"
            return "bind", f"expected an {wanted} address for scheme {scheme}"
    if route.hostnames and transport_of(scheme) == "udp":
        return "hostnames", (
            f"hostnames are read from a TLS ClientHello or a game handshake: TCP only, and "
            f"the route is {scheme}"
        )
    if route.options.proxy_protocol == "v1" and transport_of(scheme) == "udp":
        return "proxy_protocol", f"expected v2: the route is {scheme} and PROXY v1 is TCP only"
    return None


def parse_ports(text: str) -> tuple[PortMap, ...]:
    """`2222:22`, `53`, `8000-8009:9000-9009`, `7000-7002` -> listen/target pairs."""
    suffix = _PROTOCOL_SUFFIX.search(text.strip())
    if suffix is not None:  # Docker's `53/udp`: the protocol has a field of its own here
        bare = _PROTOCOL_SUFFIX.sub("", text.strip())
        protocol = suffix.group(1).lower()
        raise ValueError(
            f"expected the port without /{protocol}: use port {bare} with scheme {protocol}"
        )
    listen_text, sep, target_text = text.strip().partition(":")
    listen = _port_range(listen_text)
    target = _port_range(target_text) if sep else listen
    if len(listen) != len(target):
        raise ValueError(
            f"expected ranges of equal length, got {len(listen)} listen and "
            f"{len(target)} target ports"
        )
    return tuple(PortMap(lp, tp) for lp, tp in zip(listen, target, strict=True))


def _port_range(text: str) -> range:
    first, dash, last = text.strip().partition("-")
    bounds = (first.strip(), last.strip()) if dash else (first.strip(), first.strip())
    if not all(_digits(b) and 1 <= int(b) <= 65535 for b in bounds):
        raise ValueError(f"expected {PORT_SYNTAX}")
    low, high = int(bounds[0]), int(bounds[1])
    if low > high:
        raise ValueError(f"expected a range A-B with A <= B; {PORT_SYNTAX}")
    return range(low, high + 1)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_scheme(text: str) -> Scheme:
    value = text.strip().lower()
    for scheme in SCHEMES:
        if scheme == value:
            return scheme
    raise ValueError(f"expected one of {', '.join(SCHEMES)}")


def parse_ip(text: str) -> str:
    """An IP literal (brackets allowed), in its canonical form."""
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("expected an IP address such as 0.0.0.0, 127.0.0.1 or ::") from None


def parse_host(text: str) -> str:
    """An IP literal or a host name, without a port."""
    value = text.strip()
    try:
        return parse_ip(value)
    except ValueError:
        pass
    if _HOSTNAME.fullmatch(value):
        return value
    if ":" in value:
        raise ValueError("expected a host name or IP address without a port (port sets that)")
    raise ValueError("expected a host name or IP address")


def parse_host_port(text: str) -> tuple[str, int | None]:
    """`HOST`, `HOST:PORT`, `[V6]:PORT` or a bare IPv6 literal -> (host, port or None)."""
    value = text.strip()
    try:
        return parse_ip(value), None
    except ValueError:
        pass
    host, sep, port = value.rpartition(":")
    if not sep:
        return parse_host(value), None
    if not _digits(port) or not 1 <= int(port) <= 65535:
        raise ValueError("expected HOST or HOST:PORT with a port 1-65535")
    return parse_host(host), int(port)


def parse_proxy_protocol(text: str) -> ProxyProtocolVersion | Literal[""]:
    """`v1`, `v2`, or "" for `off`/`none` (no PROXY header)."""
    value = text.strip().lower()
    if value == "v1":
        return "v1"
    if value == "v2":
        return "v2"
    if value in ("off", "none"):
        return ""
    raise ValueError("expected v1 or v2 (or off)")


def parse_positive_int(text: str) -> int:
    value = text.strip()
    if not _digits(value) or int(value) < 1:
        raise ValueError("expected a positive whole number such as 100")
    return int(value)


def parse_load_balance(text: str) -> LoadBalance:
    value = text.strip().lower()
    for policy in LOAD_BALANCERS:
        if policy == value:
            return policy
    raise ValueError(f"expected one of {', '.join(LOAD_BALANCERS)}")


def parse_forwarding(text: str) -> RouteForwarding:
    """`auto` (the kernel where it can carry the route, else the relay) or `relay`."""
    value = text.strip().lower()
    for choice in ROUTE_FORWARDINGS:
        if choice == value:
            return choice
    if value == "kernel":
        raise ValueError(
            "expected auto or relay (kernel is not a per-route choice: auto uses it wherever "
            "it can carry the route; LABELPROXY_FORWARDING=kernel makes it required)"
        )
    raise ValueError(f"expected one of {', '.join(ROUTE_FORWARDINGS)}")


def parse_hostnames(text: str) -> tuple[str, ...]:
    """`a.example.com, *.example.com, *` -> the names a shared listener routes by, lower
    case, without a trailing dot, sorted and without repeats. `*.example.com` matches any
    name below example.com (not example.com itself); `*` alone is the fallback."""
    names: set[str] = set()
    for item in text.split(","):
        name = item.strip().lower().removesuffix(".")
        if not name:
            continue
        bare = name.removeprefix("*.")
        if name != "*" and ("*" in bare or not _HOSTNAME.fullmatch(bare)):
            raise ValueError(
                f"expected host names such as a.example.com, *.example.com or * (the "
                f"fallback), separated by commas; {item.strip()!r} is not one"
            )
        names.add(name)
    if not names:
        raise ValueError("expected at least one host name (a.example.com, *.example.com, *)")
    return tuple(sorted(names))


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true or false (also 1/0, yes/no)")
