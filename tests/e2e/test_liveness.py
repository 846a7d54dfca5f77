"""Engine liveness with a real labelproxy process and the suite's private engine: a frozen
engine (SIGSTOP of its dockerd, by PID) is a disconnect within the ping interval plus its
deadline; routes keep serving meanwhile and /readyz says which case it is; after SIGCONT the
engine is reconnected and re-listed; a frozen engine does not hold up shutdown."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import pytest

from labelproxy.sources.discovery import PING_DEADLINE, PING_INTERVAL
from tests.support.dockerd import PrivateDockerd, run_container
from tests.support.lp import (
    LabelproxyProcess,
    TcpEcho,
    accepts,
    free_port,
    wait_for,
    write_routes,
)

pytestmark = pytest.mark.docker

# a missed ping is noticed after at most one interval plus the deadline (and some scheduling)
DETECT_WITHIN = PING_INTERVAL + PING_DEADLINE + 3.0
RECOVER_WITHIN = 20.0
EXIT_WITHIN = 5.0


@contextmanager
def frozen(engine: PrivateDockerd) -> Iterator[None]:
    """SIGSTOP the engine's dockerd for the block; it is always SIGCONT'ed after."""
    pid = engine.pid
    assert pid is not None, "the private engine is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def connected(lp: LabelproxyProcess) -> float | None:
    return lp.metric("labelproxy_docker_connected")


def readyz(lp: LabelproxyProcess) -> tuple[int, str]:
    status, body = lp.get("/readyz")
    return status, body.decode()


def test_frozen_engine_is_a_disconnect_and_recovery_relists(
    tmp_path: Path, dockerd: PrivateDockerd, docker_client: docker.DockerClient,
    busybox_image: str,
) -> None:  # fmt: skip
    echo = TcpEcho()
    container_port, static_port = free_port(), free_port()
    container: Any = run_container(
        docker_client, busybox_image, command=["sleep", "600"],
        labels={"proxy.live.port": f"{container_port}:{echo.port}"},
    )  # fmt: skip
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"static": {"scheme": "tcp4", "bind": "127.0.0.1",
                                     "port": f"{static_port}:{echo.port}", "host": "127.0.0.1"}})
    lp = LabelproxyProcess(
        {"LABELPROXY_DOCKER_HOST": dockerd.host, "LABELPROXY_ROUTES_FILE": str(routes)}
    )
    try:
        lp.wait_ready()
        wait_for(lambda: accepts(container_port), what="the container's route")
        assert connected(lp) == 1
        assert readyz(lp) == (200, "ready\ndocker: connected\n")

        with frozen(dockerd):
            began = time.monotonic()
            wait_for(lambda: connected(lp) == 0, timeout=DETECT_WITHIN + 5,
                     what=f"docker_connected 0 with the engine frozen\n{lp.log()}")  # fmt: skip
            took = time.monotonic() - began
            assert took < DETECT_WITHIN, f"disconnect noticed after {took:.1f}s"
            # what was known keeps being served, and an orchestrator can tell the case apart
            assert readyz(lp) == (200, "ready\ndocker: disconnected\n")
            assert lp.routes()["docker"]["connected"] is False
            assert accepts(container_port) and accepts(static_port)
            # the container ends while the engine cannot say so; only a re-list will tell
            os.kill(container.attrs["State"]["Pid"], signal.SIGKILL)
        assert "no answer to a ping within" in lp.log()

        wait_for(lambda: connected(lp) == 1, timeout=RECOVER_WITHIN,
                 what=f"reconnected after SIGCONT\n{lp.log()}")  # fmt: skip
        wait_for(lambda: not accepts(container_port), timeout=RECOVER_WITHIN,
                 what="the route of the container that ended during the freeze gone")
        assert accepts(static_port)
        assert readyz(lp) == (200, "ready\ndocker: connected\n")

        # shutdown with the engine frozen (and reconnects to it in flight) is not held up
        with frozen(dockerd):
            wait_for(lambda: connected(lp) == 0, timeout=DETECT_WITHIN + 5,
                     what="docker_connected 0 with the engine frozen again")
            began = time.monotonic()
            assert lp.stop(timeout=EXIT_WITHIN * 3) == 0
            took = time.monotonic() - began
            assert took < EXIT_WITHIN, f"exit took {took:.1f}s with the engine frozen"
    finally:
        lp.stop()
        echo.close()
