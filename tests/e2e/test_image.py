"""The container image, built from the Dockerfile on a locally made Python base (no registry):
it relays bytes for a labelled container, reports healthy and runs as a non-root user.

The base comes from tests/support/baseimage.py (debootstrap, cached under
/var/cache/labelproxy-test). Wheels are built on the host and put in the build context, so
`docker build` installs them with --no-index. When the base cannot be made the test fails in CI
(env CI set) and is skipped with the reason elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from tests.support.baseimage import BaseImageError
from tests.support.dockerd import PrivateDockerd
from tests.support.image import build_image
from tests.support.lp import echo_roundtrip, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "labelproxy-test/labelproxy:image-test"

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the image test needs a local base image in CI: {reason}", pytrace=False)
    pytest.skip(f"cannot make the local base image: {reason}")


@pytest.fixture(scope="module")
def image(dockerd: PrivateDockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """labelproxy's image built on the private engine with the local base and host wheels."""
    dockerd.ensure_running()
    try:
        build_image(dockerd, tag=IMAGE, workdir=tmp_path_factory.mktemp("image"))
    except BaseImageError as exc:
        _unavailable(str(exc))
    yield IMAGE
    with contextlib.suppress(Exception):
        dockerd.cli("image", "rm", "-f", IMAGE, check=False)
        dockerd.cli("image", "prune", "-f", check=False)


def test_image_metadata(dockerd: PrivateDockerd, image: str) -> None:
    inspect = json.loads(dockerd.cli("image", "inspect", image).stdout)[0]
    config = inspect["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["labelproxy"]
    assert config["StopSignal"] == "SIGTERM"
    assert "9464/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    labels = config["Labels"]
    for key in ("title", "description", "source", "licenses", "version"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.version"] == "test"


def test_image_relays_for_a_labelled_container_healthy_and_non_root(
    dockerd: PrivateDockerd, docker_client: docker.DockerClient, image: str
) -> None:
    http_port, listen, target = free_port(), free_port(), free_port()
    udp_listen, udp_target = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    socket_gid = dockerd.socket_path.stat().st_gid
    proxy = docker_client.containers.run(
        image, name="lp-image-test", detach=True, network_mode="host",
        volumes={str(dockerd.socket_path): {"bind": "/var/run/docker.sock", "mode": "ro"}},
        group_add=[str(socket_gid)],
        environment={"LABELPROXY_HTTP_ADDR": f"127.0.0.1:{http_port}",
                     "LABELPROXY_DRAIN_TIMEOUT": "2s"},
        # keep the image's health check command, just ask more often
        healthcheck={"interval": 500_000_000, "timeout": 3_000_000_000, "retries": 3},
    )  # fmt: skip
    # The demo backends of compose.yaml (deploy/demo/echo.py), run from the image under test:
    # host network, listening on 127.0.0.1 only.
    for proto, port, labels in (
        ("tcp", target, {"proxy.echo.port": f"{listen}:{target}"}),
        ("udp", udp_target,
         {"proxy.uecho.port": f"{udp_listen}:{udp_target}", "proxy.uecho.scheme": "udp"}),
    ):  # fmt: skip
        docker_client.containers.run(
            image, ["/demo/echo.py", proto, "127.0.0.1", str(port)], entrypoint=["python3"],
            name=f"lp-image-{proto}-echo", detach=True, network_mode="host", init=True,
            healthcheck={"test": ["NONE"]},
            volumes={str(ROOT / "deploy" / "demo"): {"bind": "/demo", "mode": "ro"}},
            labels={**labels, **{k.replace(".port", ".bind"): "127.0.0.1" for k in labels
                                 if k.endswith(".port")}},
        )  # fmt: skip

    def logs() -> str:
        return str(proxy.logs(tail=40).decode(errors="replace"))

    def settled(what: str, condition: Callable[[], bool]) -> None:
        try:
            wait_for(condition, timeout=30, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlabelproxy log:\n{logs()}") from None

    payload = b"through the image\n" * 100
    settled("bytes through the TCP route", lambda: echo_roundtrip(listen, payload) == payload)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.5)

        def udp_echo() -> bool:
            udp.sendto(b"datagram", ("127.0.0.1", udp_listen))
            return udp.recv(100) == b"datagram"

        settled("a datagram through the image's UDP route", udp_echo)

    def health() -> str:
        proxy.reload()
        return str(proxy.attrs["State"]["Health"]["Status"])

    settled("docker inspect: healthy", lambda: health() == "healthy")
    # the image has nft, but its non-root user has no CAP_NET_ADMIN (none was added): every
    # route on the relay, said once in the log and per route on /routes
    assert proxy.exec_run(["nft", "--version"]).exit_code == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/routes", timeout=5) as resp:
        routes = json.load(resp)["routes"]
    assert {r["forwarding"] for r in routes} == {"relay"}, routes
    assert all(r["forwarding_reason"].startswith("nftables unavailable: ") for r in routes)
    full_log = proxy.logs().decode(errors="replace")
    assert full_log.count("forwarding: every route on the relay: nftables unavailable") == 1
    uid = proxy.exec_run(["python3", "-c", "import os; print(os.getuid(), os.getgroups())"])
    assert uid.exit_code == 0
    user, groups = uid.output.decode().split(" ", 1)
    assert user == "10001"
    assert str(socket_gid) in groups
    proxy.stop(timeout=10)
    proxy.reload()
    assert proxy.attrs["State"]["ExitCode"] == 0, logs()
