"""`HealthCheck`: one route's active check, as a frozen, hashable value (stdlib only).

This module imports nothing from labelproxy, so `spec.RouteOptions` can carry a `HealthCheck`
(`from labelproxy.healthcheck import HealthCheck`) without an import cycle; the parser
(`health.config`), the probes and the checker all build on it.

Kinds: `none` (no active check: a backend is ready at once), `docker` (no active check: Docker's
own HEALTHCHECK decides, which discovery already applies), `tcp` (a connect), `send_expect`
(send bytes, expect an answer that contains them or matches a regex) and the named probes of
`NAMED_PROBES`, each with the transports it speaks.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal, get_args

Kind = Literal[
    "none", "docker", "tcp", "send_expect", "redis", "dns", "minecraft", "ssh", "postgres", "mqtt"
]
Transport = Literal["tcp", "udp"]  # the same values as `spec.Transport`
Result = Literal["pass", "fail", "timeout"]

KINDS: tuple[Kind, ...] = get_args(Kind)
RESULTS: tuple[Result, ...] = get_args(Result)
# The named probes and the transports each can run over.
NAMED_PROBES: dict[Kind, frozenset[Transport]] = {
    "redis": frozenset({"tcp"}),
    "dns": frozenset({"tcp", "udp"}),
    "minecraft": frozenset({"tcp"}),
    "ssh": frozenset({"tcp"}),
    "postgres": frozenset({"tcp"}),
    "mqtt": frozenset({"tcp"}),
}
PASSIVE_KINDS: frozenset[Kind] = frozenset({"none", "docker"})

DEFAULT_INTERVAL = 5.0
DEFAULT_TIMEOUT = 2.0
DEFAULT_RISE = 2
DEFAULT_FALL = 3
MIN_INTERVAL = 0.05  # bounds check traffic per backend (tests use 0.1 s)


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: bytes) -> re.Pattern[bytes]:
    return re.compile(pattern)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """How a route's backends are checked. The default is no check (today's behaviour).

    `send` is sent after connecting (TCP) or as the datagram (UDP); `expect` is a byte string
    the answer must contain or, with `expect_regex`, a (bytes) regular expression it must
    match (`re.search`). `interval` and `timeout` are seconds; a backend goes up after `rise`
    passes in a row and down after `fall` failures in a row.
    """

    kind: Kind = "none"
    send: bytes = b""
    expect: bytes = b""
    expect_regex: bool = False
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    rise: int = DEFAULT_RISE
    fall: int = DEFAULT_FALL

    @property
    def active(self) -> bool:
        """True when labelproxy itself probes the backends (not `none` or `docker`)."""
        return self.kind not in PASSIVE_KINDS

    def matches(self, answer: bytes) -> bool:
        """Whether `answer` satisfies `expect` (contains it, or the regex finds a match)."""
        if self.expect_regex:
            return _compiled(self.expect).search(answer) is not None
        return self.expect in answer

    def same_probe(self, other: HealthCheck) -> bool:
        """True when `other` sends and expects the same (only timing or thresholds differ)."""
        return (self.kind, self.send, self.expect, self.expect_regex) == (
            other.kind, other.send, other.expect, other.expect_regex,
        )  # fmt: skip

    def to_fields(self) -> dict[str, str]:
        """The route fields that give this check back (`health.config` parses them), for
        `/routes`, `labelproxy routes` and logs. Timing is left out for `none`/`docker`."""
        fields: dict[str, str] = {"healthcheck": self.kind}
        if not self.active:
            return fields
        if self.send:
            fields["healthcheck.send"] = render_bytes(self.send)
        if self.expect:
            fields["healthcheck.expect"] = (
                "re:" + self.expect.decode("utf-8", "backslashreplace")
                if self.expect_regex
                else render_bytes(self.expect)
            )
        fields["healthcheck.interval"] = render_seconds(self.interval)
        fields["healthcheck.timeout"] = render_seconds(self.timeout)
        fields["healthcheck.rise"] = str(self.rise)
        fields["healthcheck.fall"] = str(self.fall)
        return fields

    def __str__(self) -> str:
        if not self.active:
            return self.kind
        extra = "".join(
            f" {name.removeprefix('healthcheck.')}={value}"
            for name, value in self.to_fields().items()
            if name != "healthcheck"
        )
        return f"{self.kind}{extra}"


_ESCAPES = {ord("\r"): "\\r", ord("\n"): "\\n", ord("\t"): "\\t", 0: "\\0", ord("\\"): "\\\\"}


def render_bytes(data: bytes) -> str:
    """`data` as the field text that parses back to it: escaped text when it is mostly
    printable ASCII, else `hex:...`."""
    printable = all(32 <= b < 127 or b in _ESCAPES for b in data)
    if not printable or data.startswith((b"hex:", b"re:")):
        return "hex:" + data.hex()
    return "".join(_ESCAPES.get(b, chr(b)) for b in data)


def render_seconds(seconds: float) -> str:
    """`5s`, `0.25s`, `90s`: a duration `units.parse_duration` reads back exactly."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"
