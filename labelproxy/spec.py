"""The immutable contract between route producers (labels, routes file) and the data plane.

A `RouteSpec` says everything a listener needs: where to listen (its `ListenKey`), whom to
relay to (`Backend`s, already resolved to addresses) and how (`RouteOptions`). A snapshot of
the desired state is a `DesiredState`: a mapping listen key -> RouteSpec plus the `Problem`s
found while building it. Everything here is frozen and hashable, so two snapshots are compared
by plain equality and an unchanged route is recognised as such. `binds_overlap` and
`listener_takes` say, as the kernel would, whether two listeners clash and whether a dial
would land on a listener (loop detection).

This module imports nothing from the rest of labelproxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from labelproxy.healthcheck import HealthCheck

Transport = Literal["tcp", "udp"]
Scheme = Literal["tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"]
Family = Literal["dual", "ipv4", "ipv6"]
ProxyProtocolVersion = Literal["v1", "v2"]
LoadBalance = Literal["round_robin", "least_conn", "source_hash"]
AcceptProxyProtocol = Literal["off", "optional", "required"]
# a route's `forwarding` field: `auto` (the kernel where it can carry the route) or `relay`
RouteForwarding = Literal["auto", "relay"]
# LABELPROXY_FORWARDING: `auto` uses the kernel (nftables) for the routes it can carry when
# labelproxy may program nftables here, `relay` never, `kernel` requires it at start-up
ForwardingMode = Literal["auto", "relay", "kernel"]
ProblemKind = Literal["label", "conflict", "bind", "address", "loop"]
# wake on demand (container level): how a sleeping container is put to sleep, what wakes it
StopMethod = Literal["stop", "pause", "kill"]
WakeOn = Literal["connect", "data"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SCHEMES: tuple[Scheme, ...] = get_args(Scheme)
LOAD_BALANCERS: tuple[LoadBalance, ...] = get_args(LoadBalance)
ROUTE_FORWARDINGS: tuple[RouteForwarding, ...] = get_args(RouteForwarding)

DEFAULT_UDP_MAX_SESSIONS = 10_000


def transport_of(scheme: Scheme) -> Transport:
    """`tcp`, `tcp4`, `tcp6` -> `tcp`; the `udp*` schemes -> `udp`."""
    return "udp" if scheme.startswith("udp") else "tcp"


def family_of(scheme: Scheme) -> Family:
    """Which address family a scheme listens on: `*4` IPv4, `*6` IPv6 only, else dual-stack."""
    if scheme.endswith("4"):
        return "ipv4"
    if scheme.endswith("6"):
        return "ipv6"
    return "dual"


def default_bind(scheme: Scheme) -> str:
    """The bind address used when a route names none (`::` is dual-stack for plain schemes)."""
    return "0.0.0.0" if family_of(scheme) == "ipv4" else "::"


@dataclass(frozen=True, slots=True, order=True)
class ListenKey:
    """A route's identity: what the kernel would refuse to bind twice, and, for a route
    chosen by name (`hostnames`), the names it answers to on that shared listener
    (normalized: lower case, no trailing dot, sorted); `socket_key` is the listener's."""

    transport: Transport
    bind: str
    port: int
    names: tuple[str, ...] = ()

    def __str__(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        text = f"{self.transport}://{host}:{self.port}"
        return f"{text}#{','.join(self.names)}" if self.names else text

    @property
    def socket_key(self) -> ListenKey:
        """The listening socket's key: this one without its names."""
        return ListenKey(self.transport, self.bind, self.port) if self.names else self


_ALL = "all"
# What a bind takes, per IP version: nothing (None), every address (_ALL) or one address.
_Cover = IPAddress | str | None


def ip_of(host: str) -> IPAddress | None:
    """`host` as an address (zone id dropped, IPv4-mapped IPv6 unwrapped); None: a name.

    The one parser of addresses for matching (binds, ACLs, loops, PROXY headers); the data
    plane reaches it through `streams.addresses`."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _coverage(bind: str, family: Family) -> tuple[_Cover, _Cover]:
    """The IPv4 and IPv6 addresses a listener on `bind` takes, as the kernel sees it: `::`
    dual-stack takes every address of both versions, `::` IPv6-only only the IPv6 ones,
    `0.0.0.0` every IPv4 address, a specific (or IPv4-mapped) address just that one."""
    ip = ip_of(bind)
    if ip is None:
        return bind, bind  # not an address (refused by the labels): equal to itself only
    if ip.version == 4:
        return (_ALL if ip.is_unspecified else ip), None
    if ip.is_unspecified:
        return (None if family == "ipv6" else _ALL), _ALL
    return None, ip


def binds_overlap(a: ListenKey, a_family: Family, b: ListenKey, b_family: Family) -> bool:
    """True when listeners on `a` and `b` cannot both own their port: same transport and
    port, and one bind takes an address the other takes too (`::` and `127.0.0.1`,
    `0.0.0.0` and `::` dual-stack; not `127.0.0.1` and `127.0.0.2`, nor `0.0.0.0` and
    `::` IPv6-only). TCP refuses the second bind; UDP binds both and hands each datagram to
    the more specific one, which no route owner would expect either."""
    if (a.transport, a.port) != (b.transport, b.port):
        return False
    if a.bind == b.bind:
        return True
    for x, y in zip(_coverage(a.bind, a_family), _coverage(b.bind, b_family), strict=True):
        if x is not None and y is not None and (_ALL in (x, y) or x == y):
            return True
    return False


def listener_takes(
    key: ListenKey, family: Family, host: str, *, local: frozenset[IPAddress] = frozenset()
) -> bool:
    """True when a connection to `host` (an IP literal; a name is never judged here) on
    `key.port` lands on a listener on `key`: a wildcard bind takes every local address
    (loopback, the unspecified address, and the addresses in `local`), a specific bind its
    own address."""
    ip = ip_of(host)
    if ip is None:
        return False
    if ip.is_unspecified:  # dialling 0.0.0.0 or :: reaches this host's loopback
        ip = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
    cover = _coverage(key.bind, family)[0 if ip.version == 4 else 1]
    if cover is None:
        return False
    if cover == _ALL:
        return ip.is_loopback or ip in local
    return cover == ip


def bind_address(key: ListenKey) -> IPAddress | None:
    """The one address a listener with a specific bind takes (None for a wildcard bind)."""
    ip = ip_of(key.bind)
    return None if ip is None or ip.is_unspecified else ip


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    """One upstream address of a route, and the container that serves it ("" for static)."""

    host: str
    port: int
    container_id: str = ""
    container_name: str = ""
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:  # hashed once: backends key per-connection dicts
        object.__setattr__(
            self, "_hash", hash((self.host, self.port, self.container_id, self.container_name))
        )

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wake on demand for the container behind a route (its container-level labels).

    `container_id`/`container_name` name the container to start and stop (an asleep route has
    no backend to name it); `asleep` is true while that container is stopped, exited or
    paused (the route stays bound, with no backend). `depends_on` are started first, in
    order. `idle_timeout`: seconds with no connection, no session and no byte before the
    container is stopped with `stop_method`."""

    container_id: str
    container_name: str
    idle_timeout: float
    wake_timeout: float = 180.0
    stop_method: StopMethod = "stop"
    stop_timeout: float = 60.0
    stop_signal: str = ""
    depends_on: tuple[str, ...] = ()
    wake_on: WakeOn = "connect"
    asleep: bool = False


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """Per-route behaviour. `None` means "use the global default from the settings"."""

    proxy_protocol: ProxyProtocolVersion | None = None
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    max_connections: int | None = None
    idle_timeout: float | None = None
    connect_timeout: float | None = None
    load_balance: LoadBalance = "round_robin"
    forwarding: RouteForwarding = "auto"
    healthcheck: HealthCheck = field(default_factory=HealthCheck)
    sleep: Sleep | None = None  # wake on demand (`Sleep`); None: the container never sleeps


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """Everything the data plane needs to serve one listener.

    `backends` is sorted and may be empty (every replica unhealthy): the listener then stays up
    and refuses connections with reason `no_backend`, so a flapping health check does not
    close and reopen the port.
    """

    alias: str
    scheme: Scheme
    key: ListenKey
    backends: tuple[Backend, ...]
    options: RouteOptions = field(default_factory=RouteOptions)
    source: str = ""

    @property
    def transport(self) -> Transport:
        return self.key.transport

    @property
    def family(self) -> Family:
        return family_of(self.scheme)

    def connection_limit(self, *, udp_default: int) -> int | None:
        """The cap on concurrent TCP connections / UDP sessions (UDP always has one)."""
        limit = self.options.max_connections
        if limit is None and self.transport == "udp":
            return udp_default
        return limit

    def same_listener(self, other: RouteSpec) -> bool:
        """True when `other` can be served by this spec's open socket (only backends/options
        differ), so the listener must not be closed and reopened."""
        return self.key == other.key and self.family == other.family


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the input or the runtime state, contained to one route.

    `source` is the container name or routes file path, `label` the label key or routes-file
    field, `value` the offending value, `message` what was expected or what went wrong.
    `listen` is the listen key (as text) of the route it is about when it is about exactly
    one (a bind error, a conflict on one port), else "" (a label or address error, which
    keeps the route from being built at all, or a conflict over a range of ports).
    """

    kind: ProblemKind
    route: str
    source: str
    label: str
    value: str
    message: str
    listen: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        what = f"{self.label}={self.value!r}: " if self.label else ""
        return f"{where}{what}{self.message}"


@dataclass(frozen=True, slots=True)
class DesiredState:
    """A whole snapshot: the routes that should be served and the problems found."""

    routes: Mapping[ListenKey, RouteSpec] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True, slots=True)
class EdgePolicy:
    """Global data-plane settings, built once from the Settings and passed to every listener."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    accept_proxy_protocol: AcceptProxyProtocol = "off"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    proxy_header_timeout: float = 5.0
    connect_timeout: float = 5.0
    udp_idle_timeout: float = 300.0
    udp_max_sessions: int = DEFAULT_UDP_MAX_SESSIONS
    drain_timeout: float = 30.0
    # process-wide caps, across every route (None: none); new work beyond them is shed
    max_connections: int | None = None
    udp_max_sessions_total: int | None = None
    # a listener shared by routes with `hostnames`: how long a client has to send the
    # ClientHello or game handshake that names its route (LABELPROXY_PEEK_TIMEOUT)
    peek_timeout: float = 5.0
