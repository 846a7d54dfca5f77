"""Suite-wide fixtures: the private Docker engine, the busybox image, per-test container cleanup.

`dockerd` (session) starts one private engine for the whole run (tests/support/dockerd.py) and
removes it at the end; `busybox_image` (session) builds `labelproxy-test/busybox` on it once;
`docker_client` (per test) makes sure the engine is up, hands out a docker-py client and, after
the test, removes every container (and network) the test created. When `dockerd` is not
installed, tests that need it are skipped with the reason, or fail when the env var CI is set.
A test that starts an engine of its own asks for `dockerd_available` (the same checks, no engine).
Tests that use either are marked `docker` automatically (`pytest -m "not docker"`). On
xdist workers the files of slow directories are handed out first (`WORKER_ORDER`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Generator, Iterator

import docker
import docker.errors
import pytest

from tests.support.dockerd import (
    PREDEFINED_NETWORKS,
    PrivateDockerd,
    build_busybox_image,
    missing_requirements,
)
from tests.support.lp import LabelproxyProcess

logger = logging.getLogger(__name__)

# Every labelproxy process a test starts inherits this unless it says otherwise: routes are
# relayed, because the kernel path programs nftables, which a test may only do inside a network
# namespace it created (tests/support/nslp.py and kernelworld.py ask for it). In-process
# Runtimes read no environment: they pass `forwarding="relay"` themselves.
os.environ.setdefault("LABELPROXY_FORWARDING", "relay")
DOCKER_FIXTURES = frozenset({"dockerd", "dockerd_available"})


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the private Docker engine is required in CI: {reason}", pytrace=False)
    pytest.skip(f"no private Docker engine: {reason}")


# On two workers (tests/run: pytest-xdist, a file per worker at a time) the directories of long
# files go first, so the last files handed out are short ones and no worker idles at the end.
WORKER_ORDER = ("kernel", "tooling", "e2e", "dataplane", "unit")


def _worker_rank(item: pytest.Item) -> int:
    parts = item.nodeid.split("/")
    return WORKER_ORDER.index(parts[1]) if len(parts) > 2 and parts[1] in WORKER_ORDER else 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DOCKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=_worker_rank)  # stable: files and tests keep their order within


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that ran a labelproxy process (an `lp` fixture) reports that process's
    log tail: the cause of a failure seen only in CI is then in CI's output."""
    report = yield
    if report.failed:
        lp = getattr(item, "funcargs", {}).get("lp")
        if isinstance(lp, LabelproxyProcess):
            with contextlib.suppress(Exception):
                report.sections.append(("labelproxy log (tail)", lp.log()[-6000:]))
    return report


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def dockerd_available() -> None:
    """Skip (or in CI fail) unless a private engine can run here; starts none."""
    reason = missing_requirements()
    if reason is not None:
        _unavailable(reason)


@pytest.fixture(scope="session")
def dockerd(dockerd_available: None) -> Iterator[PrivateDockerd]:
    """The suite's private engine: `.host`, `.client()`, `.restart()`, `.stop()`, `.start()`."""
    engine = PrivateDockerd()
    try:
        engine.start()
        yield engine
    finally:
        engine.cleanup()


@pytest.fixture(scope="session")
def busybox_image(dockerd: PrivateDockerd) -> str:
    """The tag of the busybox test image, built once on the private engine."""
    dockerd.ensure_running()
    with contextlib.closing(dockerd.client()) as client:
        tag: str = build_busybox_image(client)
        return tag


@pytest.fixture
def docker_client(dockerd: PrivateDockerd) -> Iterator[docker.DockerClient]:
    """A client of the private engine; the test's containers and networks are removed after."""
    dockerd.ensure_running()
    client = dockerd.client()
    containers_before = {c.id for c in client.containers.list(all=True, ignore_removed=True)}
    networks_before = {n.id for n in client.networks.list()}
    try:
        yield client
    finally:
        try:
            dockerd.ensure_running()
            for container in client.containers.list(all=True, ignore_removed=True):
                if container.id not in containers_before:
                    with contextlib.suppress(docker.errors.NotFound):
                        container.remove(force=True, v=True)
            for network in client.networks.list():
                if network.id not in networks_before and network.name not in PREDEFINED_NETWORKS:
                    with contextlib.suppress(docker.errors.APIError):
                        network.remove()
        finally:
            client.close()
