"""The suite's private engine leaves other engines' bridges alone and deletes only its own.

The engine runs inside a network namespace this test creates, next to a bridge named `docker0`
(what a developer's own Docker has): started with `--bridge=none`, dockerd deleted that bridge,
which on a real host broke the developer's Docker. It must now run on a bridge the suite created
for it, remove its own networks through its API, and leave `docker0` and a `br-*` bridge that
appeared during the run (another engine's) exactly as they were.
"""

from __future__ import annotations

import contextlib
import subprocess

import pytest

from tests.support.dockerd import PrivateDockerd, build_busybox_image, run_container
from tests.support.hostnet import Netns, ip_json, link_index
from tests.support.ports import free_port

pytestmark = pytest.mark.docker
SLEEP = ["sh", "-c", "sleep 600"]
FOREIGN_BRIDGE = "br-0123456789ab"


def _links(netns: str) -> set[str]:
    return {link["ifname"] for link in ip_json("link", "show", netns=netns)}


def test_private_engine_keeps_docker0_and_foreign_bridges_and_removes_only_its_own(
    dockerd_available: None,
) -> None:
    with Netns() as ns:

        def ip(*args: str) -> None:
            subprocess.run(["ip", "-n", ns.name, *args], check=True, capture_output=True)

        ip("link", "add", "docker0", "type", "bridge")
        ip("addr", "add", "172.17.0.1/16", "dev", "docker0")
        docker0 = link_index("docker0", netns=ns.name)
        engine = PrivateDockerd(netns=ns.name, live_restore=False)
        try:
            engine.start()
            assert engine.bridge is not None
            own_bridge = engine.bridge.name
            assert link_index("docker0", netns=ns.name) == docker0, "dockerd deleted docker0"
            with contextlib.closing(engine.client()) as client:
                image = build_busybox_image(client)
                network = client.networks.create(f"lp-safety-{free_port()}", driver="bridge")
                network_bridge = f"br-{network.id[:12]}"
                assert network_bridge in _links(ns.name)
                ip("link", "add", FOREIGN_BRIDGE, "type", "bridge")  # another engine's, mid-run
                container = run_container(
                    client, image, labels={}, command=SLEEP, network_mode="bridge"
                )
                gateway = container.attrs["NetworkSettings"]["Networks"]["bridge"]["Gateway"]
                assert gateway == str(engine.bridge.address.ip)
        finally:
            engine.cleanup()

        assert _links(ns.name) == {"lo", "docker0", FOREIGN_BRIDGE}
        assert link_index("docker0", netns=ns.name) == docker0
        assert own_bridge not in _links(ns.name) and network_bridge not in _links(ns.name)
