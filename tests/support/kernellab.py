"""A kernel test bench: a `Topology` with an engine, an upstream/local-client agent in the
host namespace and a remote-client agent in the client namespace.

`lab()` is the pytest fixture body used by the kernel tests: it skips (or fails under CI)
when namespaces cannot be made here, and always deletes what it created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.netns import Agent, Topology, missing_requirements


class KernelLab:
    """Agents in a fresh topology: `engine`, `host` (upstreams, local clients), `remote`."""

    def __init__(self, topology: Topology, *, drain_timeout: float = 30.0,
                 **policy: Any) -> None:
        self.topology = topology
        self.policy = {"drain_timeout": drain_timeout, **policy}
        self.host, self.remote, engine = topology.start_agents(
            topology.host, topology.client, topology.host)
        self.engine = self._started(engine)

    def start_engine(self) -> Agent:
        """A new engine agent in the host namespace, started (`engine_start`)."""
        return self._started(self.topology.agent(self.topology.host))

    def _started(self, engine: Agent) -> Agent:
        self.outcome = engine.call("engine_start", policy=dict(self.policy))
        return engine

    def apply(self, *routes: dict[str, Any]) -> dict[str, Any]:
        """`engine.apply` of these routes (dicts for `tests.support.kernelspec.route_spec`)."""
        result: dict[str, Any] = self.engine.call("engine_apply", routes=list(routes))
        return result

    def counters(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = self.engine.call("engine_counters")
        return result

    def serve(self, transport: str, port: int, host: str = "127.0.0.1") -> int:
        """An echo upstream in the host namespace; its id for `peers`."""
        ident: int = self.host.call("serve", transport=transport, host=host, port=port)
        return ident

    def peers(self, server: int) -> dict[str, Any]:
        result: dict[str, Any] = self.host.call("peers", server=server)
        return result

    def connect(self, client: Agent, host: str, port: int, timeout: float = 3.0) -> int:
        """A TCP connection that must succeed and echo once; its id."""
        reply = client.call("connect", host=host, port=port, timeout=timeout)
        assert "conn" in reply, f"connect to {host}:{port}: {reply}"
        conn: int = reply["conn"]
        assert client.call("echo", conn=conn) == {"ok": True}
        return conn


def lab(**policy: Any) -> Iterator[KernelLab]:
    """Fixture body: a `KernelLab` in namespaces deleted afterwards."""
    reason = missing_requirements()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"kernel tests need network namespaces in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    with Topology() as topology:
        yield KernelLab(topology, **policy)
