"""Real servers from Debian's packages, run by a test on loopback with a free port.

Each `run_*` is a context manager that starts the program in the foreground in a temporary
directory, waits (with a deadline) until it accepts on 127.0.0.1:PORT, yields the port and
stops the process by its PID. redis-server, dnsmasq, sshd, postgres and mosquitto are
installed by `.ci/run`; a missing one skips its test (fails under CI).

sshd needs its privilege-separation directory `/run/sshd`: it runs in a private mount
namespace of its own (`unshare -m`) with a tmpfs on /run, so nothing on the host is created
or changed. postgres refuses to run as root: it runs as the `postgres` user in a temporary
directory owned by that user.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.lp import accepts, free_port, wait_for

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


def require(program: str) -> str:
    """The path of `program`, or skip (fail under CI) when it is not installed."""
    path = shutil.which(program) or (
        str(POSTGRES_BIN / program) if (POSTGRES_BIN / program).exists() else None
    )
    if path is None:
        message = f"{program} is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@contextmanager
def _process(
    argv: list[str], *, port: int, log: Path, user: str | None = None, timeout: float = 30.0
) -> Iterator[int]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, user=user)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{argv[0]} exited {proc.returncode}: {log.read_text()}")
            return accepts(port)

        wait_for(up, timeout=timeout, what=f"{Path(argv[0]).name} on port {port}")
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@contextmanager
def _tempdir(owner: str | None = None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lp-health-"))
    try:
        if owner is not None:
            shutil.chown(path, owner, owner)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def run_redis() -> Iterator[int]:
    program = require("redis-server")
    port = free_port()
    with _tempdir() as tmp:
        argv = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(tmp), "--daemonize", "no"]  # fmt: skip
        with _process(argv, port=port, log=tmp / "log") as ready:
            yield ready


@contextmanager
def run_dnsmasq() -> Iterator[int]:
    """dnsmasq answering on UDP and TCP `port`; with no upstream it answers REFUSED."""
    program = require("dnsmasq")
    port = free_port()
    with _tempdir() as tmp:
        argv = [program, "--keep-in-foreground", f"--port={port}",
                "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                "--conf-file=/dev/null", "--pid-file=", "--log-facility=-"]  # fmt: skip
        with _process(argv, port=port, log=tmp / "log") as ready:
            yield ready


@contextmanager
def run_sshd() -> Iterator[int]:
    program = require("sshd")
    keygen = require("ssh-keygen")
    unshare = require("unshare")
    port = free_port()
    with _tempdir() as tmp:
        key = tmp / "hostkey"
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        config = tmp / "sshd_config"
        config.write_text(
            f"HostKey {key}\nListenAddress 127.0.0.1:{port}\nPidFile none\nUsePAM no\n"
            "StrictModes no\n"
        )
        script = (
            "mount -t tmpfs -o mode=755 lp-health-sshd /run && mkdir -m 755 /run/sshd && "
            f"exec {program} -D -e -f {config}"
        )
        argv = [unshare, "-m", "--propagation", "private", "sh", "-c", script]
        with _process(argv, port=port, log=tmp / "log") as ready:
            yield ready


@contextmanager
def run_postgres() -> Iterator[int]:
    initdb = require("initdb")
    postgres = require("postgres")
    port = free_port()
    with _tempdir(owner="postgres") as tmp:
        data = tmp / "data"
        subprocess.run(
            [initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True, user="postgres", capture_output=True, cwd=tmp,
        )  # fmt: skip
        argv = [postgres, "-D", str(data), "-p", str(port), "-k", str(tmp),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]  # fmt: skip
        with _process(argv, port=port, log=tmp / "log", user="postgres", timeout=60) as ready:
            yield ready


@contextmanager
def run_mosquitto() -> Iterator[int]:
    program = require("mosquitto")
    port = free_port()
    with _tempdir() as tmp:
        config = tmp / "mosquitto.conf"
        config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        with _process([program, "-c", str(config)], port=port, log=tmp / "log") as ready:
            yield ready
