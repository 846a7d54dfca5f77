"""Start-up failures are one line naming the setting and the value (exit status 2), never a
traceback: the real CLI as a subprocess, against a port the test holds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

STARTUP_TIMEOUT = 30


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LABELPROXY_")}
    full_env["LABELPROXY_FORWARDING"] = "relay"  # never nftables in the host's namespace
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "labelproxy", *args], env=full_env, capture_output=True,
        text=True, timeout=STARTUP_TIMEOUT, check=False,
    )  # fmt: skip


def error_lines(text: str) -> list[str]:
    """The lines of `text` that are not log records (those start with a timestamp)."""
    return [line for line in text.splitlines() if line and not line[:4].isdigit()]


def test_taken_http_addr_is_one_line_naming_setting_address_and_error() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        addr = f"127.0.0.1:{held.getsockname()[1]}"
        proc = run_cli(env={"LABELPROXY_HTTP_ADDR": addr, "LABELPROXY_DOCKER_HOST": "none"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert line == (
        f"labelproxy: cannot listen on LABELPROXY_HTTP_ADDR='{addr}': Address already in use"
    )


def test_http_addr_that_is_not_local_is_one_line() -> None:
    addr = "192.0.2.1:9464"  # TEST-NET-1: no interface of this host has it
    proc = run_cli(env={"LABELPROXY_HTTP_ADDR": addr, "LABELPROXY_DOCKER_HOST": "none"})
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc.stderr)
    assert f"LABELPROXY_HTTP_ADDR='{addr}'" in line and "assign" in line


@pytest.mark.parametrize(
    ("docker_host", "expected"),
    [
        ("tcp://", "Invalid bind address format"),
        ("tcp://127.0.0.1:notaport", "notaport"),
        ("tcp://127.0.0.1:99999", "Port out of range"),
    ],
)
def test_unusable_docker_host_is_one_line(docker_host: str, expected: str) -> None:
    env = {"LABELPROXY_HTTP_ADDR": "127.0.0.1:0", "LABELPROXY_DOCKER_HOST": docker_host}
    proc = run_cli(env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"labelproxy: invalid setting LABELPROXY_DOCKER_HOST={docker_host!r}: ")
    assert expected in line
    check = run_cli("check", env=env)
    assert check.returncode == 1
    assert "Traceback" not in check.stderr + check.stdout
    [line] = error_lines(check.stdout)
    assert docker_host in line and expected in line
