"""labelproxy end to end with kernel forwarding, all inside namespaces a test creates.

`KernelWorld` is a `Topology` (a "host" namespace with 192.0.2.1 / 2001:db8::1 on a veth to a
"client" namespace with 192.0.2.2 / 2001:db8::2, tests/support/netns.py), an agent in each
(`host`: upstreams, loopback clients, HTTP; `remote`: the remote client) and, when asked, a
private dockerd started inside the host namespace (`PrivateDockerd(netns=...)`), so its
host-network containers live there too. `labelproxy(env)` starts a real labelproxy process
there (`NsLabelproxy`); `run(labels, command)` a labelled host-network busybox container.
Nothing here touches the host's own namespace: leaving `world()` removes the containers,
stops the engine and deletes the namespaces (their links, nftables tables, conntrack
entries and sysctls with them).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import dockerd as dockerd_support
from tests.support.dockerd import PrivateDockerd, build_busybox_image
from tests.support.netns import Topology, missing_requirements
from tests.support.nslp import NsLabelproxy


class KernelWorld:
    """See the module docstring."""

    def __init__(self, topology: Topology, engine: PrivateDockerd | None) -> None:
        self.topology = topology
        self.engine = engine
        self.host, self.remote = topology.start_agents(topology.host, topology.client)
        self.client = engine.client() if engine is not None else None
        self.image = build_busybox_image(self.client) if self.client is not None else ""
        self.started: list[NsLabelproxy] = []

    @property
    def ns(self) -> str:
        return self.topology.host

    def labelproxy(self, env: dict[str, str], *, ready: bool = True,
                   without: tuple[str, ...] = ()) -> NsLabelproxy:
        """A labelproxy process in the host namespace, watching the private engine (if
        any); stopped (SIGTERM, by PID) when the test ends unless the test did already."""
        full = {"LABELPROXY_DOCKER_HOST": self.engine.host if self.engine else "none", **env}
        lp = NsLabelproxy(self.topology, full, agent=self.host, without=without)
        self.started.append(lp)
        if ready:
            lp.wait_ready()
        return lp

    def run(self, labels: dict[str, str], command: list[str] | None = None) -> Any:
        """A host-network busybox container with these labels (`sleep` unless told)."""
        assert self.client is not None, "this world has no Docker engine"
        return self.client.containers.run(
            self.image, command or ["sleep", "600"], detach=True, init=True,
            network_mode="host", labels=labels,
        )  # fmt: skip

    def serve(self, transport: str, port: int, host: str = "127.0.0.1") -> int:
        """An echo upstream in the host namespace that records its clients' addresses."""
        ident: int = self.host.call("serve", transport=transport, host=host, port=port)
        return ident

    def peers(self, server: int) -> list[str]:
        found: list[str] = self.host.call("peers", server=server)["peers"]
        return found

    def nft(self, *args: str) -> str:
        """`nft ARGS` in the host namespace (never the host's own)."""
        done = subprocess.run(["ip", "netns", "exec", self.ns, "nft", *args],
                              capture_output=True, text=True, timeout=30, check=False)
        return done.stdout if done.returncode == 0 else ""

    def kernel_routes(self) -> list[str]:
        """The identities ("listen alias") registered in labelproxy's table; [] without one."""
        listing = self.nft("-j", "list", "set", "inet", "labelproxy", "routes_v1")
        if not listing:
            return []
        found: list[str] = []
        for item in json.loads(listing)["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                inner = element.get("elem", {})
                _, _, identity = inner.get("comment", "").partition(" ")
                if inner.get("val") and identity:  # slot 0 notes route_localnet, no route
                    found.append(identity)
        return sorted(found)

    def cleanup_test(self) -> None:
        """After each test: stop its labelproxy processes and remove its containers."""
        for lp in self.started:
            with contextlib.suppress(Exception):
                lp.stop()
        self.started.clear()
        if self.engine is not None:
            self.engine.remove_all_containers()


def world(*, docker: bool) -> Iterator[KernelWorld]:
    """Fixture body (module scope): skips (fails under CI) where namespaces or the private
    engine cannot be had; always deletes what it made."""
    reason = missing_requirements() or (dockerd_support.missing_requirements() if docker
                                        else None)
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"kernel end-to-end tests need this in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    with Topology() as topology:
        engine = PrivateDockerd(netns=topology.host) if docker else None
        made: KernelWorld | None = None
        try:
            if engine is not None:
                engine.start()
            made = KernelWorld(topology, engine)
            yield made
        finally:
            if made is not None:
                made.cleanup_test()
                if made.client is not None:
                    made.client.close()
            if engine is not None:
                engine.cleanup()
