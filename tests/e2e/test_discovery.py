"""Discovery against the suite's private Docker engine: snapshots follow the running containers.

Every wait is on a callback from Discovery (an anyio Event under a deadline), never a fixed
sleep. Blocking docker-py calls made by the tests themselves run in worker threads so the
event loop (and Discovery on it) keeps running.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import docker
import pytest

from labelproxy.sources.containers import ContainerView, DiscoveryContext, PortBinding
from labelproxy.sources.discovery import Discovery
from labelproxy.sources.dockerviews import (
    daemon_host_of,
    own_container_hints,
    own_networks,
    service_of,
    view_from_attrs,
)
from tests.support.dockerd import PrivateDockerd, run_container
from tests.support.ports import free_port

pytestmark = pytest.mark.anyio
T = TypeVar("T")
DEADLINE = 20.0
SLEEP = ["sh", "-c", "sleep 600"]


@dataclass
class Recorder:
    """Collects Discovery's callbacks and lets a test await a condition on them."""

    snapshots: list[tuple[tuple[ContainerView, ...], DiscoveryContext]] = field(
        default_factory=list
    )
    connected: list[bool] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def on_snapshot(self, views: tuple[ContainerView, ...], ctx: DiscoveryContext) -> None:
        self.snapshots.append((views, ctx))
        self._changed.set()

    def on_connected(self, connected: bool) -> None:
        self.connected.append(connected)
        self._changed.set()

    def on_event(self, action: str) -> None:
        self.events.append(action)
        self._changed.set()

    def latest(self) -> dict[str, ContainerView]:
        return {v.id: v for v in self.snapshots[-1][0]} if self.snapshots else {}

    def view_where(
        self, container_id: str, condition: Callable[[ContainerView], bool]
    ) -> ContainerView | None:
        """The container's view in the latest snapshot, if it satisfies `condition`."""
        view = self.latest().get(container_id)
        return view if view is not None and condition(view) else None

    async def until(self, condition: Callable[[], T | None], *, what: str) -> T:
        """Wait (with a deadline) until `condition()` is truthy after some callback."""
        try:
            with anyio.fail_after(DEADLINE):
                while True:
                    value = condition()
                    if value:
                        return value
                    self._changed = anyio.Event()
                    await self._changed.wait()
        except TimeoutError:
            names = sorted(v.name for v in self.latest().values())
            raise AssertionError(
                f"timed out waiting for {what}; connected={self.connected} "
                f"events={self.events[-10:]} latest={names}"
            ) from None


@asynccontextmanager
async def discovering(host: str, *, resync_interval: float = 60.0) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    discovery = Discovery(
        docker_host=host,
        label_prefix="proxy",
        resync_interval=resync_interval,
        on_snapshot=recorder.on_snapshot,
        on_connected=recorder.on_connected,
        on_event=recorder.on_event,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(discovery.serve)
        yield recorder
        tg.cancel_scope.cancel()


async def start_container(client: docker.DockerClient, image: str, **kw: Any) -> Any:
    kw.setdefault("labels", {})
    kw.setdefault("command", SLEEP)
    return await anyio.to_thread.run_sync(partial(run_container, client, image, **kw))


async def test_snapshot_follows_a_container_starting_and_stopping(
    dockerd: PrivateDockerd, docker_client: docker.DockerClient, busybox_image: str
) -> None:
    async with discovering(dockerd.host) as rec:
        await rec.until(lambda: rec.connected == [True] and rec.snapshots, what="first snapshot")
        labels = {"proxy.echo.port": f"{free_port()}:7"}
        container = await start_container(docker_client, busybox_image, labels=labels)
        view = await rec.until(lambda: rec.latest().get(container.id), what="the container")
        assert view.name == container.name
        assert dict(view.labels) == labels
        assert view.network_mode == "host"
        assert view.health == "none"
        assert view.service == ""
        assert abs(view.created - time.time()) < 600  # unix seconds, not a string or ns
        assert "start" in rec.events
        assert rec.snapshots[-1][1] == DiscoveryContext(label_prefix="proxy")

        await anyio.to_thread.run_sync(partial(container.stop, timeout=5))
        await rec.until(lambda: container.id not in rec.latest(), what="the container to go")
        assert "die" in rec.events


async def test_health_check_status_reaches_the_view(
    dockerd: PrivateDockerd, docker_client: docker.DockerClient, busybox_image: str
) -> None:
    check = {"test": ["CMD", "true"], "interval": 200_000_000, "timeout": 1_000_000_000,
             "retries": 3, "start_period": 0}  # fmt: skip
    async with discovering(dockerd.host) as rec:
        container = await start_container(docker_client, busybox_image, healthcheck=check)
        view = await rec.until(
            lambda: rec.view_where(container.id, lambda v: v.health == "healthy"),
            what="health healthy",
        )
        assert view.ready
        assert "health_status" in rec.events


async def test_paused_rename_and_network_changes_republish(
    dockerd: PrivateDockerd, docker_client: docker.DockerClient, busybox_image: str
) -> None:
    async with discovering(dockerd.host) as rec:
        container = await start_container(docker_client, busybox_image, network_mode="none")
        await rec.until(lambda: container.id in rec.latest(), what="the container")

        await anyio.to_thread.run_sync(container.pause)
        await rec.until(lambda: container.id not in rec.latest(), what="paused container gone")
        await anyio.to_thread.run_sync(container.unpause)
        await rec.until(lambda: container.id in rec.latest(), what="unpaused container back")

        new_name = f"{container.name}-renamed"
        await anyio.to_thread.run_sync(partial(container.rename, new_name))
        await rec.until(
            lambda: rec.view_where(container.id, lambda v: v.name == new_name),
            what="the new name",
        )

    bridged = await start_container(docker_client, busybox_image, network_mode="bridge")
    network = await anyio.to_thread.run_sync(
        partial(docker_client.networks.create, f"lp-disc-{bridged.short_id}", driver="bridge")
    )
    async with discovering(dockerd.host) as rec:
        await rec.until(lambda: bridged.id in rec.latest(), what="the bridged container")
        await anyio.to_thread.run_sync(partial(network.connect, bridged))
        view = await rec.until(
            lambda: rec.view_where(bridged.id, lambda v: network.name in v.networks),
            what="the joined network",
        )
        assert view.networks[network.name].count(".") == 3  # an IPv4 address, never dialled


async def test_compose_and_swarm_labels_give_the_service(
    dockerd: PrivateDockerd, docker_client: docker.DockerClient, busybox_image: str
) -> None:
    compose = {"com.docker.compose.project": "demo", "com.docker.compose.service": "web"}
    swarm = {"com.docker.swarm.service.name": "stack_api"}
    async with discovering(dockerd.host) as rec:
        one = await start_container(docker_client, busybox_image, labels=compose)
        two = await start_container(docker_client, busybox_image, labels=swarm)
        await rec.until(lambda: {one.id, two.id} <= rec.latest().keys(), what="both containers")
        assert rec.latest()[one.id].service == "compose:demo/web"
        assert rec.latest()[two.id].service == "swarm:stack_api"


async def test_engine_restart_reconnects_and_resyncs(
    dockerd: PrivateDockerd, docker_client: docker.DockerClient, busybox_image: str
) -> None:
    async with discovering(dockerd.host) as rec:
        container = await start_container(docker_client, busybox_image)
        await rec.until(lambda: container.id in rec.latest(), what="the container")
        before = len(rec.snapshots)

        await anyio.to_thread.run_sync(dockerd.restart)
        await rec.until(lambda: rec.connected[-2:] == [False, True], what="reconnect")
        assert rec.connected == [True, False, True]
        assert len(rec.snapshots) > before
        # live-restore kept the container running, and the fresh snapshot says so
        assert container.id in rec.latest()


async def test_engine_down_at_start_is_retried_until_it_comes_up(dockerd_available: None) -> None:
    # an engine of its own (not the session's), on its own bridge like every private engine
    engine = PrivateDockerd()
    try:
        async with discovering(engine.host) as rec:
            await rec.until(lambda: rec.connected == [False], what="the first failure")
            assert rec.snapshots == []
            await anyio.to_thread.run_sync(engine.start)
            await rec.until(lambda: rec.connected == [False, True], what="connected")
            await rec.until(lambda: rec.snapshots, what="a snapshot")
            assert rec.snapshots[-1][0] == ()
    finally:
        await anyio.to_thread.run_sync(engine.cleanup)


def _event_reader_threads() -> list[int]:
    """Threads currently inside Discovery's event-reading loop."""
    found = []
    for ident, frame in sys._current_frames().items():
        walk: Any = frame
        while walk is not None:
            if walk.f_code.co_name == "_pump_events":
                found.append(ident)
                break
            walk = walk.f_back
    return found


async def test_cancelling_serve_returns_promptly_and_frees_the_event_thread(
    dockerd: PrivateDockerd, docker_client: docker.DockerClient
) -> None:
    with anyio.fail_after(DEADLINE):
        async with discovering(dockerd.host) as rec:
            await rec.until(lambda: rec.connected == [True], what="connected")
            while not _event_reader_threads():  # nothing signals a thread entering a function
                await anyio.sleep(0.02)
        # serve() was cancelled on leaving the block; its event thread must end by itself
        while _event_reader_threads():
            await anyio.sleep(0.02)


async def test_view_from_attrs_on_real_inspect_output(
    docker_client: docker.DockerClient, busybox_image: str
) -> None:
    network = await anyio.to_thread.run_sync(
        partial(docker_client.networks.create, f"lp-attrs-{free_port()}", driver="bridge")
    )
    published, published_udp = free_port(), free_port(kind=socket.SOCK_DGRAM)
    cases: list[tuple[dict[str, Any], Callable[[ContainerView], object]]] = [
        ({}, lambda v: v.network_mode == "host" and v.ports == () and v.health == "none"),
        ({"network_mode": "none"}, lambda v: v.networks == {"none": ""}),
        (
            {"network_mode": network.name,
             "ports": {"22/tcp": ("127.0.0.1", published), "53/udp": ("127.0.0.1", published_udp)}},
            lambda v: v.ports == (PortBinding(22, "tcp", "127.0.0.1", published),
                                  PortBinding(53, "udp", "127.0.0.1", published_udp))
            and v.networks[network.name] != "",
        ),
        (
            {"labels": {"proxy.a.port": "1:2", "com.docker.compose.project": "p",
                        "com.docker.compose.service": "s"}, "name": f"lp-named-{published}"},
            lambda v: v.name == f"lp-named-{published}" and v.service == "compose:p/s"
            and v.labels["proxy.a.port"] == "1:2",
        ),
    ]  # fmt: skip
    for kwargs, expect in cases:
        container = await start_container(docker_client, busybox_image, **kwargs)
        attrs = await anyio.to_thread.run_sync(docker_client.api.inspect_container, container.id)
        view = view_from_attrs(attrs)
        assert view.id == container.id
        assert abs(view.created - time.time()) < 600
        assert expect(view), (kwargs, view)


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        (
            {"Id": "a" * 64, "Name": "/web", "Created": "2024-05-01T10:00:00.123456789Z",
             "Config": {"Labels": None, "ExposedPorts": {"80/tcp": {}, "9/sctp": {}}},
             "HostConfig": {"NetworkMode": "default"}, "State": {"Running": True},
             "NetworkSettings": {"Ports": {}, "Networks": {"bridge": {"IPAddress": "192.0.2.2"}}}},
            ContainerView(id="a" * 64, name="web", created=1714557600.123456, labels={},
                          network_mode="bridge", networks={"bridge": "192.0.2.2"},
                          ports=(PortBinding(80, "tcp"),)),
        ),
        (
            {"Id": "b" * 64, "Name": "/db", "Created": "2024-05-01T10:00:00Z",
             "Config": {"Labels": {"com.docker.swarm.service.name": "s"}},
             "HostConfig": {"NetworkMode": "app_net"},
             "State": {"Running": True, "Health": {"Status": "unhealthy"}},
             "NetworkSettings": {
                 "Ports": {"5432/tcp": [{"HostIp": "0.0.0.0", "HostPort": "15432"},
                                        {"HostIp": "::", "HostPort": "15432"}]},
                 "Networks": {"app_net": {"IPAddress": "", "GlobalIPv6Address": "fd00::5"}}}},
            ContainerView(id="b" * 64, name="db", created=1714557600.0,
                          labels={"com.docker.swarm.service.name": "s"}, health="unhealthy",
                          network_mode="app_net", networks={"app_net": "fd00::5"},
                          ports=(PortBinding(5432, "tcp", "0.0.0.0", 15432),
                                 PortBinding(5432, "tcp", "::", 15432)),
                          service="swarm:s"),
        ),
    ],
)  # fmt: skip
def test_view_from_attrs_table(attrs: dict[str, Any], expected: ContainerView) -> None:
    view = view_from_attrs(attrs)
    assert view.created == pytest.approx(expected.created, abs=1e-6)
    assert replace(view, created=expected.created) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("unix:///var/run/docker.sock", None),
        ("tcp://192.0.2.5:2375", "192.0.2.5"),
        ("tcp://[fd00::1]:2376", "fd00::1"),
        ("ssh://user@box", None),
    ],
)
def test_daemon_host_of(host: str, expected: str | None) -> None:
    assert daemon_host_of(host) == expected


def test_own_networks_come_from_the_own_container_view() -> None:
    own = ContainerView(id="c" * 64, name="labelproxy", created=0.0, labels={},
                        networks={"front": "10.1.0.2", "back": "10.2.0.2"})  # fmt: skip
    other = ContainerView(id="d" * 64, name="web", created=0.0, labels={}, networks={"x": "1"})
    assert own_networks([other, own], frozenset({"c" * 12})) == {"front", "back"}
    assert own_networks([other, own], frozenset({"c" * 64})) == {"front", "back"}
    assert own_networks([other, own], frozenset()) == frozenset()
    assert service_of({}) == ""


async def test_own_container_is_recognised_from_inside_it(
    docker_client: docker.DockerClient, busybox_image: str
) -> None:
    network = await anyio.to_thread.run_sync(
        partial(docker_client.networks.create, f"lp-own-{free_port()}", driver="bridge")
    )
    container = await start_container(docker_client, busybox_image, network_mode=network.name)

    def read_inside(path: str) -> str:
        result = container.exec_run(["cat", path])
        assert result.exit_code == 0, result.output
        return str(result.output.decode())

    cgroup, mountinfo, hostname = await anyio.to_thread.run_sync(
        lambda: (read_inside("/proc/self/cgroup"), read_inside("/proc/self/mountinfo"),
                 read_inside("/etc/hostname").strip())
    )  # fmt: skip
    hints = own_container_hints(cgroup=cgroup, mountinfo=mountinfo, hostname=hostname)
    assert container.id in hints
    attrs = await anyio.to_thread.run_sync(docker_client.api.inspect_container, container.id)
    assert own_networks([view_from_attrs(attrs)], hints) == {network.name}

    # this test process runs on the host: the engine's container mounts must not fool it
    on_host = own_container_hints(
        cgroup=Path("/proc/self/cgroup").read_text(),
        mountinfo=Path("/proc/self/mountinfo").read_text(),
        hostname=socket.gethostname(),
    )
    assert container.id not in on_host
