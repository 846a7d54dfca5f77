"""The test suite's private Docker engine, the busybox test image, and small test helpers.

`PrivateDockerd` runs a `dockerd` of the suite's own (DESIGN.md section 4): data-root, exec-root,
pidfile and socket under one temp dir, no iptables, and `--live-restore`, so a test can restart
the engine (`restart()`) while its containers keep running. Its default bridge network is a
bridge the suite creates for it (`hostnet.SuiteBridge`, `dockerd -b NAME`): never `--bridge=none`,
with which dockerd deletes the host's `docker0`. It is stopped by PID. `cleanup()` removes its
containers, leaves its swarm and removes its networks through its own API, by ID (so the engine
deletes the bridges it made for them), stops it, unmounts what it left mounted, deletes the dir
and then the bridge it was started with. Nothing on the host is deleted by a name pattern.
`PrivateDockerd(netns=NAME)` runs the engine inside a network namespace the caller created.
Swarm mode refuses live-restore: a swarm test starts its own `PrivateDockerd(live_restore=False)`
and calls `init_swarm()`, which gives swarm's `docker_gwbridge` network a bridge of its own name.

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

from tests.support.hostnet import ENGINE_POOL, SuiteBridge, unique_name
from tests.support.ports import free_port

logger = logging.getLogger(__name__)

T = TypeVar("T")
BUSYBOX_TAG = "labelproxy-test/busybox"
BUSYBOX_BINARY = Path("/bin/busybox")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
DOCKERD_FLAGS = (
    "--iptables=false",
    "--ip6tables=false",
    "--ip-forward=false",
    "--ip-masq=false",
    "--log-level=warn",
)
# Networks get /24s from a block of their own: bridges another engine left on this host
# (in docker's default 172.17-31.x and 192.168.x pools) cannot starve this one. dockerd skips a
# /24 that overlaps a route already on the host.
DAEMON_CONFIG = {"default-address-pools": [{"base": str(ENGINE_POOL), "size": 24}]}
PREDEFINED_NETWORKS = frozenset({"bridge", "host", "none"})
NETWORK_REMOVE_TIMEOUT = 15.0
# `ip netns exec` would mount a fresh /sys and hide the cgroup mounts dockerd needs: enter the
# namespace with nsenter, and in a mount namespace of the engine's own carry /sys/fs/cgroup over
# to a /sys of that network namespace (so /sys/class/net shows its links, not the host's).
NETNS_SYS = (
    'mkdir -p "$1/sys-cgroup" && mount --rbind /sys/fs/cgroup "$1/sys-cgroup" && '
    'mount -t sysfs sysfs /sys && mount --move "$1/sys-cgroup" /sys/fs/cgroup && shift && exec "$@"'
)
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


def missing_requirements() -> str | None:
    """Why the private engine cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the private dockerd needs root"
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


class PrivateDockerd:
    """One private dockerd under `root` (a temp dir it owns); see the module doc."""

    def __init__(
        self, *, root: Path | None = None, live_restore: bool = True, netns: str | None = None
    ) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="lp-dockerd-"))
        self.live_restore = live_restore
        self.netns = netns
        self.bridge: SuiteBridge | None = None
        self._proc: subprocess.Popen[bytes] | None = None
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
        """The dockerd command line (needs `self.bridge`, which `start()` creates)."""
        if self.bridge is None:
            raise DockerdError("the engine's bridge is not created yet: call start()")
        r = self.root
        return [
            *self._netns_prefix(),
            "dockerd",
            f"--config-file={r / 'daemon.json'}",
            f"--data-root={r / 'data'}",
            f"--exec-root={r / 'exec'}",
            f"--pidfile={r / 'dockerd.pid'}",
            f"--host={self.host}",
            f"--bridge={self.bridge.name}",
            *DOCKERD_FLAGS,
            *(["--live-restore"] if self.live_restore else []),
        ]

    def _netns_prefix(self) -> list[str]:
        if self.netns is None:
            return []
        return [
            "nsenter", f"--net=/run/netns/{self.netns}", "--",
            "unshare", "--mount", "--propagation", "slave", "--",
            "sh", "-c", NETNS_SYS, "sh", str(self.root),
        ]  # fmt: skip

    def start(self, *, timeout: float = READY_TIMEOUT) -> None:
        """Start the daemon (if not running) and wait until it answers."""
        if self.running:
            return
        if self.bridge is None:
            self.bridge = SuiteBridge.create(netns=self.netns)
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

    def init_swarm(self) -> None:
        """`docker swarm init` on loopback. Swarm attaches its ingress to a network named
        `docker_gwbridge`, whose bridge would be the link `docker_gwbridge` (perhaps the host
        engine's own): create that network first, on a bridge with a run-unique name."""
        gateway_bridge = unique_name(netns=self.netns)
        with contextlib.closing(self.client()) as client:
            client.networks.create(
                "docker_gwbridge",
                driver="bridge",
                options={
                    "com.docker.network.bridge.name": gateway_bridge,
                    "com.docker.network.bridge.enable_icc": "false",
                    "com.docker.network.bridge.enable_ip_masquerade": "false",
                },
            )
        self.cli("swarm", "init", "--advertise-addr", "127.0.0.1",
                 "--listen-addr", f"127.0.0.1:{free_port()}")  # fmt: skip

    def remove_own_networks(self) -> None:
        """Leave swarm mode and remove every network of this engine through its API, by ID, so
        the engine deletes the bridge it made for each. A network still in use (an endpoint
        going away) is retried until `NETWORK_REMOVE_TIMEOUT`."""
        if not self.running:
            return
        with contextlib.closing(self.client()) as client:
            if client.info().get("Swarm", {}).get("LocalNodeState") == "active":
                client.swarm.leave(force=True)
            deadline = time.monotonic() + NETWORK_REMOVE_TIMEOUT
            while True:
                left = [n for n in client.networks.list()
                        if n.name not in PREDEFINED_NETWORKS and n.attrs.get("Scope") != "swarm"]
                for network in left:
                    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                        client.api.remove_network(network.id)
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(POLL_INTERVAL)
            if left:
                logger.warning("could not remove networks %s of the private engine",
                               ", ".join(n.name for n in left))  # fmt: skip

    def cleanup(self) -> None:
        """Remove the containers and networks (through the engine), stop the daemon, unmount its
        leftovers, delete its dir, then the bridge it was started with. An engine a test left
        stopped is started again first when it has state to clean up."""
        if not self.running and self.bridge is not None and (self.root / "data").is_dir():
            try:
                self.start()
            except DockerdError as exc:
                logger.warning("could not restart the private engine to clean it up: %s", exc)
        try:
            self.remove_all_containers()
            self.remove_own_networks()
        except Exception as exc:
            logger.warning("could not clean up the private engine's containers/networks: %s", exc)
        self.stop()
        self._kill_leftover_processes()
        for mount in sorted(self._mounts(), key=lambda p: p.count("/"), reverse=True):
            done = subprocess.run(["umount", mount], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.bridge is not None:
            self.bridge.delete()
            self.bridge = None

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
