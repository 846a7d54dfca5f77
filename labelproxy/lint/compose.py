"""Compose files -> `ContainerView`s, for `labelproxy check --compose FILE`.

`load_compose` gets the compose model from `composeread.read_compose` (the `docker compose`
plugin, else a standalone `docker-compose`, else the YAML read as Compose v2 reads it) and
normalises it. One normaliser serves every reader: `labels` and `deploy.labels` as a map or a
`KEY=VALUE` list, `ports` in short (`[IP:]HOST:CONTAINER[/proto]`, ranges) and long syntax,
`expose`, `network_mode`, `networks` (list or map), `deploy.replicas` / `scale`, and what
orders container creation (`depends_on`, `links`, `network_mode: service:X`, `volumes_from`).

Each service becomes one `ContainerView` named after the service (or its `container_name`), in
replica group `compose:<project>/<service>` (its replicas share its routes), with `created` in
the order Compose creates containers: the services a service depends on first, file order
otherwise. Compose creates services that do not depend on each other in parallel, so between
those the order is not known before `up` (`composeorder` reports that). Network addresses are
not known before the containers run, so a service's address on network N is `<service>@<N>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from labelproxy.lint.composeread import ComposeError, read_compose
from labelproxy.sources.containers import ContainerView, PortBinding
from labelproxy.spec import Transport

__all__ = ["ComposeError", "ComposeProject", "ComposeService", "load_compose", "views_of"]

logger = logging.getLogger(__name__)

_SHORT_PORT = re.compile(
    r"^(?:(?P<ip>\[[^\]]*\]|[^:\[\]]*):)??(?:(?P<host>[0-9]*(?:-[0-9]+)?):)?"
    r"(?P<target>[0-9]+(?:-[0-9]+)?)(?:/(?P<proto>tcp|udp|sctp))?$"
)


@dataclass(frozen=True, slots=True)
class ComposeService:
    """The parts of one compose service that routing depends on."""

    name: str
    container_name: str
    image: str
    labels: Mapping[str, str]
    deploy_labels: Mapping[str, str]
    network_mode: str
    networks: tuple[str, ...]  # full network names (project-prefixed unless `name:` is set)
    ports: tuple[PortBinding, ...]
    replicas: int
    environment: Mapping[str, str]
    entrypoint_overridden: bool
    depends_on: tuple[str, ...] = ()  # services whose containers Compose creates first

    @property
    def looks_like_labelproxy(self) -> bool:
        """True for the service that runs labelproxy itself (its image's own entrypoint, or
        LABELPROXY_* settings in its environment)."""
        if any(key.startswith("LABELPROXY_") for key in self.environment):
            return True
        return "labelproxy" in self.image and not self.entrypoint_overridden


@dataclass(frozen=True)
class ComposeProject:
    """A normalised compose model: project name, services in file order, and who read it."""

    name: str
    services: tuple[ComposeService, ...]
    reader: str  # "docker compose config", "docker-compose config" or "yaml"
    detail: str = ""  # the reader in one line (version, why the ones before it were not used)
    notes: tuple[str, ...] = ()  # things about the reading the user should see

    def depends_on(self, name: str) -> frozenset[str]:
        """Every service that service `name` depends on, directly or not."""
        return self._closure.get(name, frozenset())

    @cached_property
    def _closure(self) -> dict[str, frozenset[str]]:
        names = {svc.name for svc in self.services}
        direct = {svc.name: set(svc.depends_on) & names for svc in self.services}
        closure: dict[str, frozenset[str]] = {}
        for name, deps in direct.items():
            seen: set[str] = set()
            todo = list(deps)
            while todo:
                dep = todo.pop()
                if dep not in seen and dep != name:
                    seen.add(dep)
                    todo.extend(direct.get(dep, ()))
            closure[name] = frozenset(seen)
        return closure

    def creation_order(self) -> list[ComposeService]:
        """Services in the order Compose creates them: dependencies first, else file order."""
        placed: list[ComposeService] = []
        done: set[str] = set()
        pending = list(self.services)
        while pending:  # a cycle (Compose refuses it) falls back to file order
            ready = next((s for s in pending if self.depends_on(s.name) <= done), pending[0])
            placed.append(ready)
            done.add(ready.name)
            pending.remove(ready)
        return placed


def load_compose(path: Path, *, use_cli: bool = True) -> ComposeProject:
    """Read `path` as Compose does (see `composeread`); raises `ComposeError`."""
    if not path.is_file():
        raise ComposeError(f"{path}: no such file")
    model = read_compose(path, use_cli=use_cli)
    project = project_from_config(
        model.config, default_name=_project_name(path.resolve().parent.name), reader=model.reader
    )
    return dataclasses.replace(project, detail=model.detail, notes=model.notes)


def project_from_config(
    config: Mapping[str, Any], *, default_name: str, reader: str = "yaml"
) -> ComposeProject:
    """Normalise a compose model (raw YAML or a `config` output) into a `ComposeProject`."""
    name = _project_name(str(config.get("name") or default_name))
    services_raw = config.get("services") or {}
    if not isinstance(services_raw, dict):
        raise ComposeError("expected `services` to be a mapping of service name -> service")
    top_networks = config.get("networks") or {}
    if not isinstance(top_networks, dict):
        raise ComposeError("expected `networks` to be a mapping of network name -> network")
    services: list[ComposeService] = []
    for svc_name, svc in services_raw.items():
        if not isinstance(svc or {}, dict):
            raise ComposeError(f"service {svc_name}: expected a mapping, got {svc!r}")
        try:
            services.append(
                _service(str(svc_name), svc or {}, project=name, top_networks=top_networks)
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ComposeError(f"service {svc_name}: unreadable: {exc}") from None
    return ComposeProject(name=name, services=tuple(services), reader=reader)


def views_of(project: ComposeProject) -> list[ContainerView]:
    """One `ContainerView` per service (replicas share its routes), in creation order."""
    views: list[ContainerView] = []
    for order, svc in enumerate(project.creation_order()):
        labels = dict(svc.labels)  # deploy.labels never reach containers
        group = f"compose:{project.name}/{svc.name}"
        digest = hashlib.sha256(group.encode()).hexdigest()
        networks = {net: f"{svc.name}@{net}" for net in svc.networks}
        views.append(
            ContainerView(
                id=digest, name=svc.container_name or svc.name, created=float(order),
                labels=labels, network_mode=svc.network_mode, networks=networks,
                ports=svc.ports, service=group,
            )
        )  # fmt: skip
    return views


def _project_name(raw: str) -> str:
    """Compose's rule: lower case, only [a-z0-9_-], starting with a letter or digit."""
    cleaned = re.sub(r"[^a-z0-9_-]", "", raw.lower()).lstrip("_-")
    return cleaned or "default"


def _service(
    name: str, svc: Mapping[str, Any], *, project: str, top_networks: Mapping[str, Any]
) -> ComposeService:
    deploy = svc.get("deploy") or {}
    mode = str(svc.get("network_mode") or "")
    networks: tuple[str, ...] = ()
    if not mode:
        raw_nets = svc.get("networks")
        names = list(raw_nets) if raw_nets else ["default"]
        networks = tuple(sorted(_network_name(n, project, top_networks) for n in names))
        mode = networks[0] if networks else "bridge"
    ports = [*_published(svc.get("ports") or ()), *_exposed(svc.get("expose") or ())]
    replicas = deploy.get("replicas") if isinstance(deploy, dict) else None
    if replicas is None:
        replicas = svc.get("scale", 1)
    entrypoint = svc.get("entrypoint")
    return ComposeService(
        depends_on=tuple(_dependencies(svc)),
        name=name,
        container_name=str(svc.get("container_name") or ""),
        image=str(svc.get("image") or ""),
        labels=_labels(svc.get("labels")),
        deploy_labels=_labels(deploy.get("labels") if isinstance(deploy, dict) else None),
        network_mode=mode,
        networks=networks,
        ports=tuple(dict.fromkeys(ports)),
        replicas=int(replicas),
        environment=_labels(svc.get("environment")),
        entrypoint_overridden=entrypoint is not None,
    )


def _dependencies(svc: Mapping[str, Any]) -> Iterator[str]:
    """The services whose containers Compose creates before this service's."""
    deps = svc.get("depends_on") or ()
    yield from (str(d) for d in deps)  # list form, or the keys of the map form
    for link in svc.get("links") or ():
        yield str(link).split(":", 1)[0]
    mode = str(svc.get("network_mode") or "")
    if mode.startswith("service:"):
        yield mode.removeprefix("service:")
    for source in svc.get("volumes_from") or ():
        text = str(source)
        if not text.startswith("container:"):
            yield text.split(":", 1)[0]


def _network_name(key: str, project: str, top_networks: Mapping[str, Any]) -> str:
    spec = top_networks.get(key) or {}
    if isinstance(spec, dict) and spec.get("name"):
        return str(spec["name"])
    if isinstance(spec, dict) and spec.get("external") is True:
        return key
    return f"{project}_{key}"


def _labels(raw: Any) -> dict[str, str]:
    """A compose labels/environment field, map or `KEY=VALUE` list, as a str -> str dict."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {str(k): "" if v is None else _scalar(v) for k, v in raw.items()}
    out: dict[str, str] = {}
    for item in raw:
        key, _, value = str(item).partition("=")
        out[key.strip()] = value
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    lo = int(first)
    return list(range(lo, int(last) + 1)) if last else [lo]


def _proto(raw: Any) -> Transport | None:
    proto = str(raw or "tcp").lower()
    if proto == "tcp":
        return "tcp"
    if proto == "udp":
        return "udp"
    return None  # sctp: nothing labelproxy can relay


def _published(raw: Any) -> Iterator[PortBinding]:
    for item in raw:
        if isinstance(item, dict):  # long syntax, and every `config` output
            proto = _proto(item.get("protocol"))
            if proto is None:
                continue
            targets = _range(str(item.get("target")))
            host_ip = str(item.get("host_ip") or "")
            published = str(item.get("published") or "")
            hosts: list[int | None] = (
                [*_range(published)] if published else [None] * len(targets)
            )
            if len(hosts) != len(targets):
                hosts = [hosts[0]] * len(targets)
            for target, host in zip(targets, hosts, strict=True):
                yield PortBinding(target, proto, host_ip if host is not None else "", host)
            continue
        match = _SHORT_PORT.match(str(item).strip())
        if match is None:
            logger.warning("unreadable port %r ignored", item)
            continue
        proto = _proto(match["proto"])
        if proto is None:
            continue
        targets = _range(match["target"])
        host_ip = (match["ip"] or "").strip("[]")
        host_text = match["host"]
        short_hosts: list[int | None] = (
            [*_range(host_text)] if host_text else [None] * len(targets)
        )
        if len(short_hosts) != len(targets):
            short_hosts = [short_hosts[0]] * len(targets)
        for target, host in zip(targets, short_hosts, strict=True):
            # "8080" alone publishes on a random host port, unknown here: treated as exposed
            yield PortBinding(target, proto, host_ip if host is not None else "", host)


def _exposed(raw: Any) -> Iterator[PortBinding]:
    for item in raw:
        port_text, _, proto_text = str(item).partition("/")
        proto = _proto(proto_text or "tcp")
        if proto is None:
            continue
        for port in _range(port_text):
            yield PortBinding(port, proto)
