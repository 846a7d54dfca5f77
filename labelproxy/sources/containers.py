"""What discovery hands to the pure label code: a plain, frozen view of one running container.

Discovery (the only module that imports `docker`) turns each container it lists into a
`ContainerView`; `labels`, `resolve` and `desired` work on these views only, so they can be
tested with plain values. `DiscoveryContext` carries the few facts about labelproxy's own
situation that target resolution needs (label prefix, own networks, remote daemon host).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from labelproxy.spec import Transport

logger = logging.getLogger(__name__)

Health = Literal["none", "starting", "healthy", "unhealthy"]

# Health states whose container is left out of its route's backend pool.
UNREADY_HEALTH: frozenset[str] = frozenset({"starting", "unhealthy"})


@dataclass(frozen=True, slots=True)
class PortBinding:
    """One container port, exposed only (`host_port is None`) or published on the host."""

    port: int
    protocol: Transport
    host_ip: str = ""
    host_port: int | None = None

    @property
    def published(self) -> bool:
        return self.host_port is not None


@dataclass(frozen=True, slots=True)
class ContainerView:
    """The parts of a running container that routing depends on.

    `name` has no leading `/`; `created` is unix seconds (earlier wins conflicts, ties go to
    the smaller id); `networks` maps network name -> the container's IP on it ("" if none);
    `service` is the replica group ("compose:<project>/<service>", "swarm:<service>" or "").
    """

    id: str
    name: str
    created: float
    labels: Mapping[str, str]
    health: Health = "none"
    network_mode: str = "bridge"
    networks: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[PortBinding, ...] = ()
    service: str = ""
    # the engine's state: `running`; a sleep-enabled container is listed stopped too
    # (`exited`, `created`, `paused`): its routes stay bound, asleep (`sources.sleeplabels`)
    state: str = "running"

    @property
    def running(self) -> bool:
        """True while the container runs (not stopped, exited or paused)."""
        return self.state == "running"

    @property
    def ready(self) -> bool:
        """False while Docker's health check says `starting` or `unhealthy`, or asleep."""
        return self.running and self.health not in UNREADY_HEALTH

    def protocols_of(self, port: int) -> frozenset[Transport]:
        """The protocols under which container port `port` is exposed or published."""
        return frozenset(b.protocol for b in self.ports if b.port == port)


@dataclass(frozen=True, slots=True)
class DiscoveryContext:
    """labelproxy's own situation, as far as turning labels into routes needs it.

    `own_networks`: the networks labelproxy's own container is on (empty when it runs on the
    host). `daemon_host`: for a remote `tcp://` daemon, the host dialled for host-network
    containers and wildcard-published ports; `None` means 127.0.0.1.
    """

    label_prefix: str = "proxy"
    own_networks: frozenset[str] = frozenset()
    daemon_host: str | None = None

    @property
    def local_host(self) -> str:
        """The address that reaches the Docker host's own ports."""
        return self.daemon_host or "127.0.0.1"
