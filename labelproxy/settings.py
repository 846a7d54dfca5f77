"""Process settings from `LABELPROXY_*` environment variables, built once by the CLI.

`Settings` is frozen and validated by pydantic-settings; `load_settings` turns a validation
error into one `SettingsError` line naming the variable and what it expected.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from labelproxy.spec import AcceptProxyProtocol, EdgePolicy, IPNetwork
from labelproxy.units import (
    check_duration,
    parse_cidr_list,
    parse_duration,
    parse_positive_duration,
)

ENV_PREFIX = "LABELPROXY_"
# LABELPROXY_FORWARDING: `auto` uses the kernel (nftables) for the routes it can carry when
# labelproxy may program nftables here, `relay` never, `kernel` requires it at start-up
Forwarding = Literal["auto", "relay", "kernel"]


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
CidrList = Annotated[tuple[IPNetwork, ...], NoDecode, BeforeValidator(_cidrs)]


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


def _default_docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


class SettingsError(Exception):
    """A setting is invalid; the message is one line naming the variable."""


class Settings(BaseSettings):
    """Every `LABELPROXY_*` setting (see the README's settings reference)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    docker_host: str = Field(default_factory=_default_docker_host)
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
    trusted_proxies: CidrList = ()
    allow: CidrList = ()
    deny: CidrList = ()
    resync_interval: PositiveDuration = 60.0
    forwarding: Forwarding = "auto"
    # process-wide caps (None: `auto`, see `auto_limit`)
    max_connections: Limit = None
    udp_max_sessions_total: Limit = None

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
        )


def split_host_port(addr: str) -> tuple[str, int]:
    """`0.0.0.0:9464` / `[::1]:9464` / `:9464` -> (host, port); raises ValueError."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 0.0.0.0:9464, got {addr!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build the settings from the environment, or raise one clear `SettingsError`."""
    try:
        if env is None:
            return Settings()
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(env)
            return Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ENV_PREFIX + "_".join(str(p) for p in first["loc"]).upper()
        given = first.get("input")
        message = str(first["msg"]).removeprefix("Value error, ")
        raise SettingsError(f"invalid setting {name}={given!r}: {message}") from None
