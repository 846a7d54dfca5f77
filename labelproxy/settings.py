"""Process settings from `LABELPROXY_*` environment variables, built once by the CLI.

`Settings` is frozen and validated by pydantic; it reads no environment itself.
`load_settings(env)` is the one place that does: it takes the variables of `env` (by default
the process environment, which it only reads) and turns a validation error into one
`SettingsError` line naming the variable and what it expected.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from labelproxy.spec import AcceptProxyProtocol, EdgePolicy, ForwardingMode, IPNetwork
from labelproxy.units import (
    check_duration,
    parse_cidr_list,
    parse_duration,
    parse_positive_duration,
)

ENV_PREFIX = "LABELPROXY_"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


def _duration(value: Any) -> float:
    if isinstance(value, int | float):
        return check_duration(float(value))
    return parse_duration(str(value))


def _positive_duration(value: Any) -> float:
    if isinstance(value, int | float):
        return check_duration(float(value), positive=True)
    return parse_positive_duration(str(value))


def _cidrs(value: Any) -> tuple[IPNetwork, ...]:
    if isinstance(value, tuple):
        return value
    return parse_cidr_list(str(value))


# zero is a valid drain ("close at once"), never a valid dial, idle, header or resync period
Duration = Annotated[float, BeforeValidator(_duration)]
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]
CidrList = Annotated[tuple[IPNetwork, ...], BeforeValidator(_cidrs)]


# -- process-wide limits ----------------------------------------------------------------
def _limit(value: Any) -> int | None:
    """`auto` (or empty) -> None, derived at start from the open-files limit; else a count."""
    text = str(value).strip().lower() if value is not None else "auto"
    if text in ("", "auto"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError("expected a positive whole number or auto")
    return int(text)


Limit = Annotated[int | None, BeforeValidator(_limit)]


def auto_limit(open_files: int) -> int:
    """The default of each global cap for a process allowed `open_files` descriptors: an
    eighth (at least 1,024, at most half) is kept for the control plane (listeners, the
    HTTP server, the engine, pipes), and each cap gets a quarter of the rest, so TCP at its
    cap (two sockets a connection) and UDP at its cap (one a session) take three quarters."""
    reserve = max(open_files // 8, min(1024, open_files // 2))
    return max(1, (open_files - reserve) // 4)


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE in force (`runtime.raise_fd_limit` raised it at start)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


class SettingsError(Exception):
    """A setting is invalid; the message is one line naming the variable."""


class Settings(BaseSettings):
    """Every `LABELPROXY_*` setting (see the README's settings reference), from the keyword
    arguments only: `load_settings` reads the environment."""

    model_config = SettingsConfigDict(frozen=True)

    docker_host: str = DEFAULT_DOCKER_HOST
    label_prefix: str = "proxy"
    routes_file: Path | None = None
    http_addr: str = "0.0.0.0:9464"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    drain_timeout: Duration = 30.0
    connect_timeout: PositiveDuration = 5.0
    udp_idle_timeout: PositiveDuration = 300.0
    udp_max_sessions: int = Field(default=10_000, ge=1)
    accept_proxy_protocol: AcceptProxyProtocol = "off"
    proxy_header_timeout: PositiveDuration = 5.0
    peek_timeout: PositiveDuration = 5.0  # a shared (`hostnames`) listener's name read
    trusted_proxies: CidrList = ()
    allow: CidrList = ()
    deny: CidrList = ()
    resync_interval: PositiveDuration = 60.0
    forwarding: ForwardingMode = "auto"
    # process-wide caps (None: `auto`, see `auto_limit`)
    max_connections: Limit = None
    udp_max_sessions_total: Limit = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The keyword arguments alone: no process-wide environment or file is read here."""
        return (init_settings,)

    @field_validator("log_level", "log_format", "accept_proxy_protocol", "forwarding",
                     mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("label_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip().rstrip(".")
        if not value or any(c.isspace() for c in value):
            raise ValueError("expected a non-empty label prefix without spaces, such as proxy")
        return value

    @field_validator("http_addr")
    @classmethod
    def _http_addr(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("docker_host")
    @classmethod
    def _docker_host(cls, value: str) -> str:
        value = value.strip()
        if value.lower() == "none":
            return "none"
        if not value.startswith(("unix://", "tcp://", "ssh://", "npipe://", "http://")):
            raise ValueError("expected unix:///path, tcp://host:port, ssh://host or none")
        return value

    @property
    def discovery_enabled(self) -> bool:
        return self.docker_host != "none"

    def edge_policy(self, *, open_files: int | None = None) -> EdgePolicy:
        """The data-plane part of the settings; `auto` caps are derived from `open_files`
        (default: the open-files limit in force now)."""
        auto = auto_limit(open_files_limit() if open_files is None else open_files)
        return EdgePolicy(
            allow=self.allow,
            deny=self.deny,
            accept_proxy_protocol=self.accept_proxy_protocol,
            trusted_proxies=self.trusted_proxies,
            proxy_header_timeout=self.proxy_header_timeout,
            connect_timeout=self.connect_timeout,
            udp_idle_timeout=self.udp_idle_timeout,
            udp_max_sessions=self.udp_max_sessions,
            drain_timeout=self.drain_timeout,
            max_connections=self.max_connections or auto,
            udp_max_sessions_total=self.udp_max_sessions_total or auto,
            peek_timeout=self.peek_timeout,
        )


def split_host_port(addr: str) -> tuple[str, int]:
    """`0.0.0.0:9464` / `[::1]:9464` / `:9464` -> (host, port); raises ValueError."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 0.0.0.0:9464, got {addr!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def settings_values(env: Mapping[str, str]) -> dict[str, str]:
    """The `LABELPROXY_*` variables of `env` as `Settings` fields (names in any case, as the
    shell may give them); `DOCKER_HOST` stands in for an unset `LABELPROXY_DOCKER_HOST`."""
    named = {key.lower(): value for key, value in env.items()}
    values = {
        name: named[f"{ENV_PREFIX}{name}".lower()]
        for name in Settings.model_fields
        if f"{ENV_PREFIX}{name}".lower() in named
    }
    if "docker_host" not in values and env.get("DOCKER_HOST"):
        values["docker_host"] = env["DOCKER_HOST"]
    return values


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from `env` (default: the process environment, read and never
    changed), or raise one clear `SettingsError`."""
    try:
        return Settings.model_validate(settings_values(os.environ if env is None else env))
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ENV_PREFIX + "_".join(str(p) for p in first["loc"]).upper()
        given = first.get("input")
        message = str(first["msg"]).removeprefix("Value error, ")
        raise SettingsError(f"invalid setting {name}={given!r}: {message}") from None
