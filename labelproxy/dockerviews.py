"""Pure conversion of Docker's inspect JSON into `ContainerView`s, and own-container detection.

No `docker` import and no I/O beyond reading /proc for `read_own_hints`: usable by discovery,
`labelproxy check` and tests without an engine.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from labelproxy.containers import ContainerView, Health, PortBinding

logger = logging.getLogger(__name__)

_CONTAINER_ID = re.compile(r"\b([0-9a-f]{64})\b")
_DOCKER_MOUNTED_FILES = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})


def view_from_attrs(attrs: Mapping[str, Any]) -> ContainerView:
    """A container's `docker inspect` JSON (or docker-py `Container.attrs`) -> its view."""
    config = attrs.get("Config") or {}
    state = attrs.get("State") or {}
    settings = attrs.get("NetworkSettings") or {}
    labels = {str(k): str(v) for k, v in (config.get("Labels") or {}).items()}
    health = str((state.get("Health") or {}).get("Status") or "none")
    mode = str((attrs.get("HostConfig") or {}).get("NetworkMode") or "bridge")
    networks = {
        str(name): str(ep.get("IPAddress") or ep.get("GlobalIPv6Address") or "")
        for name, ep in (settings.get("Networks") or {}).items()
        if isinstance(ep, Mapping)
    }
    return ContainerView(
        id=str(attrs["Id"]),
        name=str(attrs.get("Name") or "").lstrip("/"),
        created=_parse_created(attrs.get("Created")),
        labels=labels,
        health=cast(Health, health if health in ("starting", "healthy", "unhealthy") else "none"),
        network_mode="bridge" if mode == "default" else mode,
        networks=networks,
        ports=_port_bindings(settings.get("Ports") or {}, config.get("ExposedPorts") or {}),
        service=service_of(labels),
    )


def service_of(labels: Mapping[str, str]) -> str:
    """The replica group a container belongs to: compose service, swarm service, or ""."""
    project = labels.get("com.docker.compose.project")
    service = labels.get("com.docker.compose.service")
    if project and service:
        return f"compose:{project}/{service}"
    swarm = labels.get("com.docker.swarm.service.name")
    return f"swarm:{swarm}" if swarm else ""


def daemon_host_of(docker_host: str) -> str | None:
    """The host of a remote `tcp://` (or `http(s)://`) engine; None for a local socket."""
    parts = urlsplit(docker_host)
    if parts.scheme in ("tcp", "http", "https") and parts.hostname:
        return parts.hostname
    return None


def _parse_created(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    text = str(value or "")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        logger.warning("unreadable container creation time %r", text)
        return 0.0


def _port_bindings(
    published: Mapping[str, Any], exposed: Mapping[str, Any]
) -> tuple[PortBinding, ...]:
    found: set[PortBinding] = set()
    for key in {*published, *exposed}:
        number, _, proto = str(key).partition("/")
        if proto not in ("tcp", "udp") or not number.isdigit():
            continue  # sctp and the like cannot be routed
        port, transport = int(number), cast(Any, proto)
        hosts = published.get(key) or []
        for host in hosts:
            host_port = str(host.get("HostPort") or "")
            if host_port.isdigit():
                found.add(
                    PortBinding(port, transport, str(host.get("HostIp") or ""), int(host_port))
                )
        if not hosts:
            found.add(PortBinding(port, transport))
    return tuple(sorted(found, key=lambda b: (b.port, b.protocol, b.host_ip, b.host_port or 0)))


def own_container_hints(*, cgroup: str, mountinfo: str, hostname: str) -> frozenset[str]:
    """Ids (or the 12-char id prefix) labelproxy's own container may have; empty on a host.

    Evidence: a docker cgroup path (cgroup v1), the `/etc/hostname`-like files Docker mounts
    from `.../containers/<id>/` (cgroup v2), and a hostname that looks like a short id."""
    hints: set[str] = set()
    for line in cgroup.splitlines():
        if "docker" in line:
            hints.update(_CONTAINER_ID.findall(line))
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] in _DOCKER_MOUNTED_FILES and "/containers/" in fields[3]:
            hints.update(_CONTAINER_ID.findall(fields[3]))
    if re.fullmatch(r"[0-9a-f]{12}", hostname):
        hints.add(hostname)
    return frozenset(hints)


def read_own_hints() -> frozenset[str]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text(errors="replace")
        except OSError:
            return ""

    return own_container_hints(
        cgroup=read("/proc/self/cgroup"),
        mountinfo=read("/proc/self/mountinfo"),
        hostname=socket.gethostname(),
    )


def own_networks(views: Iterable[ContainerView], hints: frozenset[str]) -> frozenset[str]:
    """The networks of labelproxy's own container, if it is among `views`."""
    for view in views:
        if view.id in hints or view.id[:12] in hints:
            return frozenset(n for n in view.networks if n not in ("host", "none"))
    return frozenset()
