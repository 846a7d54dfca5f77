"""Run a real labelproxy process for end-to-end tests, and small socket helpers.

`LabelproxyProcess` starts `python -m labelproxy` with the given environment, waits for its
HTTP endpoints, reads /routes and /metrics, and stops it by PID. Every wait has a deadline.
`prefix` goes before the command (`ip netns exec NS`, `setpriv ...`: each execs the next).
It runs in the test's own network namespace (the host's, unless the test runs in one of its
own), so it relays: `LABELPROXY_FORWARDING=relay` unless the test says otherwise, and only
tests that start it inside a namespace they created (`tests/support/netns.py`) may.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from tests.support import ports

T = TypeVar("T")
POLL = 0.05
# the suite's port helpers, here for the tests (and bench/) that import them from here
free_port = ports.free_port
consecutive_free_ports = ports.consecutive_free_ports


def wait_for(
    condition: Callable[[], T | None], *, timeout: float = 15.0, what: str = "condition"
) -> T:
    """Poll `condition` until it returns a truthy value, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the condition may fail while the state converges
            last_exc = exc
        time.sleep(POLL)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True when a TCP connect to host:port succeeds (and is closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def echo_roundtrip(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=5.0) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def recv_all(s: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = s.recv(n - len(buf))
        if not data:
            raise AssertionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += data
    return buf


class UdpEcho:
    """A UDP echo server on 127.0.0.1 owned by the test, in a thread."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            self.sock.sendto(data, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class LabelproxyProcess:
    """A labelproxy child process with its HTTP endpoints on a free loopback port."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        log_path: Path | None = None,
        max_open_files: int | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LABELPROXY_")}
        full_env.update(
            {
                "LABELPROXY_HTTP_ADDR": f"127.0.0.1:{self.http_port}",
                "LABELPROXY_LOG_LEVEL": "debug",
                "LABELPROXY_DRAIN_TIMEOUT": "1s",  # a test about draining sets its own
                # never nftables in the host's namespace (tests/support/hostguard.py)
                "LABELPROXY_FORWARDING": "relay",
            }
        )
        full_env.update(env)
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="labelproxy-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        def limit_files() -> None:  # runs in the child, before exec
            if max_open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "labelproxy"],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_files if max_open_files is not None else None,  # noqa: PLW1509
        )

    # -- HTTP --------------------------------------------------------------------------
    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def routes(self) -> dict[str, Any]:
        status, body = self.get("/routes")
        assert status == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def route(self, alias: str) -> dict[str, Any] | None:
        for r in self.routes()["routes"]:
            if r["route"] == alias:
                return dict(r)
        return None

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body.decode()

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample of /metrics, or None when absent."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            if "{" in head:
                mname, _, rest = head.partition("{")
                got = ",".join(sorted(rest.rstrip("}").split(",")))
            else:
                mname, got = head, ""
            if mname == name and got == want:
                return float(value)
        return None

    def wait_ready(self, timeout: float = 20.0) -> None:
        wait_for(lambda: self.alive() and self.get("/readyz")[0] == 200, timeout=timeout,
                 what=f"labelproxy ready\n{self.log()}")

    def wait_http(self, timeout: float = 20.0) -> None:
        wait_for(lambda: self.get("/healthz")[0] == 200, timeout=timeout,
                 what=f"labelproxy /healthz\n{self.log()}")

    # -- process -------------------------------------------------------------------------
    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"labelproxy exited with {self.proc.returncode}:\n{self.log()}")
        return True

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return int(self.proc.returncode)


@contextmanager
def labelproxy(env: dict[str, str], *, ready: bool = True) -> Iterator[LabelproxyProcess]:
    lp = LabelproxyProcess(env)
    try:
        if ready:
            lp.wait_ready()
        else:
            lp.wait_http()
        yield lp
    finally:
        lp.stop()


class TcpEcho:
    """A threaded TCP echo server on 127.0.0.1 owned by the test; counts accepted connections."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(512)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                return

    def stop_listening(self) -> None:
        """Close the listening socket only (new connections are refused); connections
        already accepted are served to their end, as a program that stops listening does.
        The socket closes before the accept thread's timeout runs out: no connection waits
        in the backlog meanwhile, to be reset by the close (a client would see an error)."""
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=5)

    def close(self) -> None:
        self.stop_listening()
        for conn in self._conns:
            with suppress(OSError):
                conn.close()


def write_routes(path: Path, routes: dict[str, dict[str, Any]]) -> None:
    """Write a routes file (YAML is a superset of JSON)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"routes": routes}, indent=2))
    tmp.replace(path)
