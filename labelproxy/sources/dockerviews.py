"""Pure conversion of Docker's JSON into `ContainerView`s, and own-container detection.

Two sources: an entry of the container list (`GET /containers/json`, `view_from_summary`: what
discovery uses, one request for all containers) and a container's inspect JSON
(`view_from_attrs`). The list lacks two facts inspect has: the creation time below the second,
and the exposed-only ports of a container whose network mode maps no ports (host, none,
`container:`), whose list `Ports` is empty. `InspectDetails` carries those two from an inspect;
with them, `view_from_summary` gives exactly `view_from_attrs`'s view.

No `docker` import and no I/O beyond reading /proc for `read_own_hints`: usable by discovery,
`labelproxy check` and tests without an engine.
"""

from __future__ import annotations

import logging
import math
import re
import socket
from collections.abc import Collection, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from labelproxy.sources.containers import ContainerView, Health, PortBinding
from labelproxy.sources.labels import LabelFacts, label_facts
from labelproxy.spec import Transport

logger = logging.getLogger(__name__)

_CONTAINER_ID = re.compile(r"\b([0-9a-f]{64})\b")
_DOCKER_MOUNTED_FILES = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})
_HEALTH_IN_STATUS = re.compile(r"\((healthy|unhealthy|health: starting)\)")


@dataclass(frozen=True, slots=True)
class InspectDetails:
    """What only inspect tells about a container (both fixed when it is created)."""

    created: float
    exposed: frozenset[tuple[int, Transport]]


def details_from_attrs(attrs: Mapping[str, Any]) -> InspectDetails:
    """The `InspectDetails` of a container's inspect JSON."""
    exposed = {_port_key(key) for key in (attrs.get("Config") or {}).get("ExposedPorts") or {}}
    return InspectDetails(
        created=_parse_created(attrs.get("Created")),
        exposed=frozenset(key for key in exposed if key is not None),
    )


def view_from_summary(
    summary: Mapping[str, Any], *, details: InspectDetails | None = None
) -> ContainerView:
    """One entry of the engine's container list -> its view (see the module doc)."""
    labels = {str(k): str(v) for k, v in (summary.get("Labels") or {}).items()}
    mode = str((summary.get("HostConfig") or {}).get("NetworkMode") or "bridge")
    settings = summary.get("NetworkSettings") or {}
    ports: set[PortBinding] = set()
    for entry in summary.get("Ports") or ():
        proto, number, public = entry.get("Type"), entry.get("PrivatePort"), entry.get("PublicPort")
        if proto not in ("tcp", "udp") or not isinstance(number, int):
            continue
        if public:
            ports.add(PortBinding(number, proto, str(entry.get("IP") or ""), int(public)))
        else:
            ports.add(PortBinding(number, proto))
    if details is not None:
        listed = {(b.port, b.protocol) for b in ports}
        ports.update(PortBinding(n, p) for n, p in details.exposed if (n, p) not in listed)
    return ContainerView(
        id=str(summary["Id"]),
        name=_primary_name(summary.get("Names") or ()),
        created=_parse_created(summary.get("Created")) if details is None else details.created,
        labels=labels,
        health=_health_of(summary),
        network_mode="bridge" if mode == "default" else mode,
        networks=_networks(settings.get("Networks") or {}),
        ports=_sorted_ports(ports),
        service=service_of(labels),
        state=str(summary.get("State") or "running"),
    )


def needing_details(
    views: Iterable[ContainerView],
    *,
    label_prefix: str,
    known: Collection[str] = (),
    memo: MutableMapping[str, LabelFacts] | None = None,
) -> set[str]:
    """Ids (not in `known`) of the containers whose list view could route differently from
    their inspect view, so that discovery inspects only those:

    - a route's scheme defaults from the container's ports and the list shows none (the
      exposed ports of a host, none or `container:` mode container are only in inspect);
    - containers created in the same second that claim a common listen port: which one was
      created first (and holds the port) needs the time below the second.

    `memo` (container id -> its `LabelFacts`; labels never change) saves parsing them again."""
    memo = {} if memo is None else memo
    need: set[str] = set()
    by_second: dict[int, list[tuple[str, frozenset[int]]]] = {}
    for view in views:
        facts = memo.get(view.id)
        if facts is None:
            facts = label_facts(view.labels, label_prefix=label_prefix, name=view.name)
            memo[view.id] = facts
        if facts.scheme_from_ports and not view.ports:
            need.add(view.id)
        if facts.listen_ports:
            by_second.setdefault(math.floor(view.created), []).append((view.id, facts.listen_ports))
    for group in by_second.values():
        if len(group) < 2:
            continue
        claims: dict[int, set[str]] = {}
        for cid, ports in group:
            for port in ports:
                claims.setdefault(port, set()).add(cid)
        for ids in claims.values():
            if len(ids) > 1:
                need.update(ids)
    return need.difference(known)


def _primary_name(names: Iterable[str]) -> str:
    """The container's own name: the list also gives legacy link names (`/web/db`)."""
    stripped = [str(n).lstrip("/") for n in names]
    return next((n for n in stripped if "/" not in n), stripped[0] if stripped else "")


def _health_of(summary: Mapping[str, Any]) -> Health:
    """Health from the list: its `Health` (API 1.52+), else the "(healthy)" in `Status`."""
    status = str((summary.get("Health") or {}).get("Status") or "")
    if not status:
        found = _HEALTH_IN_STATUS.search(str(summary.get("Status") or ""))
        status = found.group(1).removeprefix("health: ") if found else "none"
    return cast(Health, status if status in ("starting", "healthy", "unhealthy") else "none")


def _networks(endpoints: Mapping[str, Any]) -> dict[str, str]:
    return {
        str(name): str(ep.get("IPAddress") or ep.get("GlobalIPv6Address") or "")
        for name, ep in endpoints.items()
        if isinstance(ep, Mapping)
    }


def view_from_attrs(attrs: Mapping[str, Any]) -> ContainerView:
    """A container's `docker inspect` JSON (or docker-py `Container.attrs`) -> its view."""
    config = attrs.get("Config") or {}
    state = attrs.get("State") or {}
    settings = attrs.get("NetworkSettings") or {}
    labels = {str(k): str(v) for k, v in (config.get("Labels") or {}).items()}
    health = str((state.get("Health") or {}).get("Status") or "none")
    mode = str((attrs.get("HostConfig") or {}).get("NetworkMode") or "bridge")
    networks = _networks(settings.get("Networks") or {})
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
        state=str(state.get("Status") or "running"),
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


def _port_key(key: object) -> tuple[int, Transport] | None:
    """`"80/tcp"` -> (80, "tcp"); None for sctp and the like, which cannot be routed."""
    number, _, proto = str(key).partition("/")
    if proto not in ("tcp", "udp") or not number.isdigit():
        return None
    return int(number), cast(Transport, proto)


def _port_bindings(
    published: Mapping[str, Any], exposed: Mapping[str, Any]
) -> tuple[PortBinding, ...]:
    found: set[PortBinding] = set()
    for key in {*published, *exposed}:
        parsed = _port_key(key)
        if parsed is None:
            continue
        port, transport = parsed
        hosts = published.get(key) or []
        for host in hosts:
            host_port = str(host.get("HostPort") or "")
            if host_port.isdigit():
                found.add(
                    PortBinding(port, transport, str(host.get("HostIp") or ""), int(host_port))
                )
        if not hosts:
            found.add(PortBinding(port, transport))
    return _sorted_ports(found)


def _sorted_ports(found: Iterable[PortBinding]) -> tuple[PortBinding, ...]:
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
