"""End to end on a Swarm-mode private engine: a labelled service's task becomes a route, and a
rolling update of the service moves the route to the new task without closing the port.

Swarm refuses live-restore, so this module starts its own engine. Services use host
networking and `--no-resolve-image` (no registry here).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dockerd import PrivateDockerd, build_busybox_image, private_dockerd
from tests.support.lp import LabelproxyProcess, echo_roundtrip, free_port, labelproxy, wait_for

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def swarm(dockerd_available: None) -> Iterator[PrivateDockerd]:
    with private_dockerd(live_restore=False) as engine:
        engine.init_swarm()
        yield engine


def echoes(port: int) -> bool:
    try:
        return echo_roundtrip(port, b"swarm") == b"swarm"
    except OSError:
        return False


def test_swarm_service_task_is_routed_and_follows_updates(swarm: PrivateDockerd) -> None:
    image = build_busybox_image(swarm.client())
    listen, target = free_port(), free_port()
    name = "lp-swarm-echo"
    swarm.cli(
        "service", "create", "--detach", "--name", name, "--no-resolve-image",
        "--network", "host", "--init",
        "--container-label", f"proxy.web.port={listen}:{target}",
        "--container-label", "proxy.web.bind=127.0.0.1",
        image, "nc", "-ll", "-p", str(target), "-e", "cat",
    )  # fmt: skip
    lp: LabelproxyProcess
    with labelproxy({"LABELPROXY_DOCKER_HOST": swarm.host}) as lp:
        wait_for(lambda: echoes(listen), timeout=60, what="the service's task is routed")
        route = lp.route("web")
        assert route is not None and route["source"] == f"swarm:{name}"
        first = route["backends"][0]["container"]

        # a rolling update replaces the task: the route follows, the listener stays
        swarm.cli("service", "update", "--detach", "--force", "--no-resolve-image", name)
        wait_for(
            lambda: (lp.route("web") or {"backends": [{"container": first}]})["backends"][0][
                "container"
            ] != first,
            timeout=60,
            what="the route's backend is the new task",
        )
        wait_for(lambda: echoes(listen), timeout=30, what="the new task is routed")
        swarm.cli("service", "rm", name)
        wait_for(lambda: lp.route("web") is None, timeout=60, what="route gone with the service")
