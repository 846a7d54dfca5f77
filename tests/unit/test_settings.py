"""Settings: defaults, parsing, and one clear line for each bad setting."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping

import pytest

from labelproxy.settings import SettingsError, load_settings


def test_defaults() -> None:
    s = load_settings({})
    assert s.docker_host == "unix:///var/run/docker.sock"
    assert s.label_prefix == "proxy"
    assert s.http_addr == "0.0.0.0:9464"
    assert (s.drain_timeout, s.connect_timeout, s.udp_idle_timeout) == (30.0, 5.0, 300.0)
    assert s.accept_proxy_protocol == "off"
    assert s.resync_interval == 60.0
    assert s.forwarding == "auto"


def test_docker_host_falls_back_to_docker_host_variable() -> None:
    assert load_settings({"DOCKER_HOST": "tcp://127.0.0.1:2375"}).docker_host == (
        "tcp://127.0.0.1:2375"
    )
    assert load_settings({"LABELPROXY_DOCKER_HOST": "none"}).discovery_enabled is False


def test_values_parse() -> None:
    s = load_settings(
        {
            "LABELPROXY_ALLOW": "10.0.0.0/8, fd00::/8",
            "LABELPROXY_DENY": "10.9.0.0/16",
            "LABELPROXY_DRAIN_TIMEOUT": "1m30s",
            "LABELPROXY_UDP_IDLE_TIMEOUT": "90",
            "LABELPROXY_LOG_FORMAT": "JSON",
            "LABELPROXY_ACCEPT_PROXY_PROTOCOL": "required",
            "LABELPROXY_TRUSTED_PROXIES": "127.0.0.1",
            "LABELPROXY_FORWARDING": " Kernel",
        }
    )
    assert s.forwarding == "kernel"
    assert s.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert s.drain_timeout == 90.0
    assert s.udp_idle_timeout == 90.0
    assert s.log_format == "json"
    edge = s.edge_policy()
    assert edge.accept_proxy_protocol == "required"
    assert edge.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LABELPROXY_DRAIN_TIMEOUT", "soon", "duration"),
        ("LABELPROXY_ALLOW", "10.0.0.0/33", "CIDR"),
        ("LABELPROXY_LOG_LEVEL", "loud", "debug"),
        ("LABELPROXY_LOG_FORMAT", "xml", "text"),
        ("LABELPROXY_HTTP_ADDR", "9464", "HOST:PORT"),
        ("LABELPROXY_DOCKER_HOST", "docker.sock", "unix://"),
        ("LABELPROXY_ACCEPT_PROXY_PROTOCOL", "yes", "optional"),
        ("LABELPROXY_LABEL_PREFIX", "my prefix", "prefix"),
        ("LABELPROXY_CONNECT_TIMEOUT", "0", "positive duration"),
        ("LABELPROXY_CONNECT_TIMEOUT", "nan", "duration"),
        ("LABELPROXY_CONNECT_TIMEOUT", "inf", "duration"),
        ("LABELPROXY_CONNECT_TIMEOUT", "1e400", "duration"),
        ("LABELPROXY_UDP_IDLE_TIMEOUT", "0s", "positive duration"),
        ("LABELPROXY_UDP_IDLE_TIMEOUT", "9999999h", "at most 8760h"),
        ("LABELPROXY_PROXY_HEADER_TIMEOUT", "0", "positive duration"),
        ("LABELPROXY_RESYNC_INTERVAL", "0", "positive duration"),
        ("LABELPROXY_DRAIN_TIMEOUT", "nan", "duration"),
        ("LABELPROXY_DRAIN_TIMEOUT", "-1s", "non-negative"),
        ("LABELPROXY_FORWARDING", "nftables", "'auto', 'relay' or 'kernel'"),
    ],
)
def test_bad_setting_names_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({name: value})
    message = str(info.value)
    assert "\n" not in message
    assert name in message and repr(value) in message and expected in message


def test_zero_drain_timeout_means_close_at_once() -> None:
    assert load_settings({"LABELPROXY_DRAIN_TIMEOUT": "0"}).drain_timeout == 0.0


def test_bad_setting_stops_startup_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "labelproxy"],
        env={"LABELPROXY_CONNECT_TIMEOUT": "fast", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "LABELPROXY_CONNECT_TIMEOUT" in lines[0] and "'fast'" in lines[0]


class _WatchedEnv(Mapping[str, str]):
    """A settings environment that records, whenever one of its values is read, what the
    process environment held then (another thread reading it at that moment sees the same)."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self.process_env_seen: list[dict[str, str]] = []

    def __getitem__(self, key: str) -> str:
        self.process_env_seen.append(dict(os.environ))
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def test_loading_from_a_mapping_leaves_the_process_environment_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, load_settings(env) cleared os.environ and filled it with `env` while it
    validated: every thread of the process saw that environment meanwhile."""
    monkeypatch.setenv("LABELPROXY_LOG_LEVEL", "debug")
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    before = dict(os.environ)
    env = _WatchedEnv({"LABELPROXY_DRAIN_TIMEOUT": "7s"})
    settings = load_settings(env)
    assert settings.drain_timeout == 7.0
    # the process's variables do not leak into settings built from another mapping
    assert settings.log_level == "info"
    assert settings.docker_host == "unix:///var/run/docker.sock"
    assert env.process_env_seen and all(seen == before for seen in env.process_env_seen)
    assert dict(os.environ) == before


def test_loading_the_process_environment_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELPROXY_LOG_LEVEL", "warning")
    monkeypatch.setenv("labelproxy_drain_timeout", "2s")  # names in any case, as before
    monkeypatch.delenv("LABELPROXY_DOCKER_HOST", raising=False)
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    before = dict(os.environ)
    settings = load_settings()
    assert (settings.log_level, settings.drain_timeout) == ("warning", 2.0)
    assert settings.docker_host == "tcp://127.0.0.1:2375"
    assert dict(os.environ) == before
