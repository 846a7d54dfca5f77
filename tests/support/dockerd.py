"""The test suite's private Docker engine, the busybox test image, and small test helpers.

`PrivateDockerd` runs a `dockerd` of the suite's own (DESIGN.md section 4): data-root, exec-root,
pidfile and socket under one temp dir, no bridge, no iptables, and `--live-restore`, so a test
can restart the engine (`restart()`) while its containers keep running. It is stopped by PID;
`cleanup()` removes its containers, unmounts what it left mounted and deletes the dir.
Swarm mode refuses live-restore: a swarm test starts its own `PrivateDockerd(live_restore=False)`.

`build_busybox_image` builds `labelproxy-test/busybox` (FROM scratch + Debian's static busybox)
with the classic builder, never pulling. `run_container` creates and starts a container the
way the tests need it (init, detached, host network by default) without ever pulling.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import docker

logger = logging.getLogger(__name__)

T = TypeVar("T")
BUSYBOX_TAG = "labelproxy-test/busybox"
BUSYBOX_BINARY = Path("/bin/busybox")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
DOCKERD_FLAGS = (
    "--bridge=none",
    "--iptables=false",
    "--ip-forward=false",
    "--ip-masq=false",
    "--log-level=warn",
)
# Networks get /24s from a block of their own: bridges another engine left on this host
# (in docker's default 172.17-31.x and 192.168.x pools) cannot starve this one.
DAEMON_CONFIG = {"default-address-pools": [{"base": "10.213.0.0/16", "size": 24}]}
BUSYBOX_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
CMD ["sh"]
"""


class DockerdError(Exception):
    """The private engine did not start or stop as asked; the message says why."""


def wait_for(
    condition: Callable[[], T | None], *, timeout: float = 10.0, what: str = "condition"
) -> T:
    """Poll `condition` until it returns a truthy value, or raise TimeoutError after `timeout`.

    For states nothing notifies us of (a daemon answering, a port closing); prefer awaiting an
    event where there is one."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def free_port(*, kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port number free on 127.0.0.1 right now (TCP by default)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing_requirements() -> str | None:
    """Why the private engine cannot run here, or None when it can."""
    if shutil.which("dockerd") is None:
        return "dockerd is not installed (apt-get install -y docker.io busybox-static)"
    if not BUSYBOX_BINARY.is_file():
        return f"{BUSYBOX_BINARY} is missing (apt-get install -y busybox-static)"
    if b"ld-linux" in BUSYBOX_BINARY.read_bytes()[:8192]:
        return f"{BUSYBOX_BINARY} is dynamically linked: install busybox-static"
    return None


def _ping(socket_path: Path) -> bool:
    """True when the engine on `socket_path` answers `GET /_ping` with OK."""
    conn = http.client.HTTPConnection("localhost", timeout=2.0)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(socket_path))
        conn.sock = sock
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()
        sock.close()


def _net_links() -> set[str]:
    try:
        return set(os.listdir("/sys/class/net"))
    except OSError:
        return set()


class PrivateDockerd:
    """One private dockerd under `root` (a temp dir it owns); see the module doc."""

    def __init__(self, *, root: Path | None = None, live_restore: bool = True) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="lp-dockerd-"))
        self.live_restore = live_restore
        self._proc: subprocess.Popen[bytes] | None = None
        self._links_before: set[str] | None = None
        (self.root / "daemon.json").write_text(json.dumps(DAEMON_CONFIG) + "\n")

    @property
    def socket_path(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        """The DOCKER_HOST URL of this engine."""
        return f"unix://{self.socket_path}"

    @property
    def env(self) -> dict[str, str]:
        """The environment for a docker CLI (or labelproxy) process aimed at this engine."""
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        r = self.root
        return [
            "dockerd",
            f"--config-file={r / 'daemon.json'}",
            f"--data-root={r / 'data'}",
            f"--exec-root={r / 'exec'}",
            f"--pidfile={r / 'dockerd.pid'}",
            f"--host={self.host}",
            *DOCKERD_FLAGS,
            *(["--live-restore"] if self.live_restore else []),
        ]

    def start(self, *, timeout: float = READY_TIMEOUT) -> None:
        """Start the daemon (if not running) and wait until it answers."""
        if self.running:
            return
        if self._links_before is None:
            self._links_before = _net_links()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while not _ping(self.socket_path):
            if self._proc.poll() is not None:
                raise DockerdError(f"dockerd exited with {self._proc.returncode}: {self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise DockerdError(f"dockerd not ready after {timeout:.0f}s: {self._tail()}")
            time.sleep(POLL_INTERVAL)
        logger.info("private dockerd %d ready at %s", self._proc.pid, self.host)

    def stop(self, *, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the daemon by PID and wait for it to exit (SIGKILL after `timeout`).

        With live-restore, running containers survive this."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("dockerd %d ignored SIGTERM for %.0fs: killing it", proc.pid, timeout)
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        """Stop by PID and start again on the same data dir, waiting until ready."""
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        """Start the daemon again if an earlier test left it stopped."""
        if not self.running:
            self.start()

    def client(self, *, timeout: float = 60.0) -> docker.DockerClient:
        """A docker-py client for this engine (the caller closes it)."""
        return docker.DockerClient(base_url=self.host, timeout=timeout)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine."""
        return subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, check=check,
            timeout=timeout,
        )  # fmt: skip

    def remove_all_containers(self) -> None:
        """`docker rm -f` every container of this engine."""
        if not self.running:
            return
        with contextlib.closing(self.client()) as client:
            for container in client.containers.list(all=True, ignore_removed=True):
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True, v=True)

    def cleanup(self) -> None:
        """Remove the containers, stop the daemon, unmount its leftovers and delete its dir."""
        try:
            self.remove_all_containers()
        except Exception as exc:
            logger.warning("could not remove the private engine's containers: %s", exc)
        self.stop()
        self._kill_leftover_processes()
        self._remove_bridges()
        for mount in sorted(self._mounts(), key=lambda p: p.count("/"), reverse=True):
            done = subprocess.run(["umount", mount], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def _remove_bridges(self) -> None:
        """Delete the host bridges this engine's networks left behind: a network's bridge
        outlives the daemon, and with a fresh data dir every run the next engine would
        never reuse it; enough of them exhaust the address pool."""
        if self._links_before is None:
            return
        for name in sorted(_net_links() - self._links_before):
            if name.startswith("br-") or name == "docker_gwbridge":
                subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)

    def _mounts(self) -> list[str]:
        prefix = str(self.root)
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
        return found

    def _kill_leftover_processes(self) -> None:
        """Kill, by PID, what outlived the daemon: processes still naming this engine's dir
        (containerd, shims) and the containers those shims ran (their children), so no
        container process is left behind, reparented to init."""
        marker = str(self.root).encode()
        leftovers: set[int] = set()
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            pid = int(entry.name)
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
            if marker in cmdline:
                leftovers.add(pid)
        containers = {pid for pid, parent in parents.items() if parent in leftovers}
        if leftovers:
            logger.warning(
                "killing %d leftover engine processes and %d container processes",
                len(leftovers),
                len(containers - leftovers),
            )
        for pid in [*sorted(containers - leftovers), *sorted(leftovers)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def private_dockerd(*, live_restore: bool = True) -> Iterator[PrivateDockerd]:
    """A started private engine, cleaned up on exit."""
    engine = PrivateDockerd(live_restore=live_restore)
    try:
        engine.start()
        yield engine
    finally:
        engine.cleanup()


def build_busybox_image(client: docker.DockerClient, *, tag: str = BUSYBOX_TAG) -> str:
    """Build (once per engine) the busybox image from Debian's static busybox; never pulls."""
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(tag)
        return tag
    with tempfile.TemporaryDirectory(prefix="lp-busybox-") as context:
        shutil.copy2(BUSYBOX_BINARY, Path(context) / "busybox")
        (Path(context) / "Dockerfile").write_text(BUSYBOX_DOCKERFILE)
        client.images.build(path=context, tag=tag, pull=False, rm=True, forcerm=True)
    return tag


def run_container(
    client: docker.DockerClient,
    image: str,
    *,
    labels: Mapping[str, str],
    command: str | list[str],
    name: str | None = None,
    network_mode: str = "host",
    healthcheck: Mapping[str, Any] | None = None,
    **kw: Any,
) -> Any:
    """Create and start a container (init, detached; host network unless told) without pulling.

    Returns the docker-py Container, reloaded after start. The `docker_client` fixture removes
    it after the test."""
    container = client.containers.create(
        image,
        command,
        labels=dict(labels),
        name=name,
        network_mode=network_mode,
        healthcheck=dict(healthcheck) if healthcheck is not None else None,
        init=True,
        detach=True,
        **kw,
    )
    container.start()
    container.reload()
    return container
