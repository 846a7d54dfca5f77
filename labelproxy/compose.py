"""Compose files -> `ContainerView`s, for `labelproxy check --compose FILE`.

The file is read as Compose itself reads it: `load_compose` asks `docker compose config
--format json` (Compose v2), else `docker-compose config` (v1), for the normalised model
(interpolation, `.env`, profiles, `extends`, merged override files); only when neither tool is
installed does it read the YAML itself. Both shapes go through one normaliser, which accepts
`labels` and `deploy.labels` as a map or a `KEY=VALUE` list, `ports` in short (`[IP:]HOST:CONTAINER
[/proto]`, ranges) and long syntax, `expose`, `network_mode`, `networks` (list or map) and
`deploy.replicas` / `scale`.

Each service becomes one `ContainerView` named after the service (or its `container_name`), in
replica group `compose:<project>/<service>`, created in file order (so the earlier service holds
a contested port, as the one started first would). Network addresses are not known before the
containers run, so a service's address on network N is shown as `<service>@<N>`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from labelproxy.containers import ContainerView, PortBinding
from labelproxy.spec import Transport

logger = logging.getLogger(__name__)

CONFIG_TIMEOUT = 30.0
_SHORT_PORT = re.compile(
    r"^(?:(?P<ip>\[[^\]]*\]|[^:\[\]]*):)??(?:(?P<host>[0-9]*(?:-[0-9]+)?):)?"
    r"(?P<target>[0-9]+(?:-[0-9]+)?)(?:/(?P<proto>tcp|udp|sctp))?$"
)


class ComposeError(Exception):
    """The compose file cannot be read; the message says why."""


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

    @property
    def looks_like_labelproxy(self) -> bool:
        """True for the service that runs labelproxy itself (its image's own entrypoint, or
        LABELPROXY_* settings in its environment)."""
        if any(key.startswith("LABELPROXY_") for key in self.environment):
            return True
        return "labelproxy" in self.image and not self.entrypoint_overridden


@dataclass(frozen=True, slots=True)
class ComposeProject:
    """A normalised compose model: project name, services in file order, and who read it."""

    name: str
    services: tuple[ComposeService, ...]
    reader: str  # "docker compose config", "docker-compose config" or "yaml"


def load_compose(path: Path, *, use_cli: bool = True) -> ComposeProject:
    """Read `path` as Compose does (see the module docstring); raises `ComposeError`."""
    if not path.is_file():
        raise ComposeError(f"{path}: no such file")
    default_name = _project_name(path.resolve().parent.name)
    if use_cli:
        for reader, config in _cli_configs(path):
            return project_from_config(config, default_name=default_name, reader=reader)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ComposeError(f"{path}: not a readable YAML file: {exc}") from None
    if not isinstance(config, dict):
        raise ComposeError(f"{path}: expected a mapping with `services`")
    return project_from_config(config, default_name=default_name, reader="yaml")


def _cli_configs(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The normalised model from the first Compose CLI that is installed and accepts the file.

    A CLI that rejects the file raises `ComposeError` with its message (that *is* the lint
    result); a CLI that is missing or broken is skipped."""
    commands: list[tuple[str, list[str], bool]] = []
    if shutil.which("docker"):
        commands.append(
            ("docker compose config",
             ["docker", "compose", "-f", str(path), "config", "--format", "json"], True)
        )  # fmt: skip
    if shutil.which("docker-compose"):
        commands.append(
            ("docker-compose config", ["docker-compose", "-f", str(path), "config"], False)
        )
    for reader, cmd, is_json in commands:
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=CONFIG_TIMEOUT, check=False,
                cwd=path.resolve().parent,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            logger.debug("%s unusable: %s", reader, exc)
            continue
        if done.returncode != 0:
            stderr = done.stderr.strip()
            if "unknown command" in stderr or "is not a docker command" in stderr:
                continue  # docker without the compose plugin
            raise ComposeError(f"{reader} rejected {path}: {stderr}")
        try:
            config = json.loads(done.stdout) if is_json else yaml.safe_load(done.stdout)
        except (ValueError, yaml.YAMLError) as exc:
            logger.debug("%s printed an unreadable model: %s", reader, exc)
            continue
        if isinstance(config, dict):
            yield reader, config
            return


def project_from_config(
    config: Mapping[str, Any], *, default_name: str, reader: str = "yaml"
) -> ComposeProject:
    """Normalise a compose model (raw YAML or a `config` output) into a `ComposeProject`."""
    name = _project_name(str(config.get("name") or default_name))
    services_raw = config.get("services") or {}
    if not isinstance(services_raw, dict):
        raise ComposeError("expected `services` to be a mapping of service name -> service")
    top_networks = config.get("networks") or {}
    services = tuple(
        _service(svc_name, svc or {}, project=name, top_networks=top_networks)
        for svc_name, svc in services_raw.items()
    )
    return ComposeProject(name=name, services=services, reader=reader)


def views_of(project: ComposeProject) -> list[ContainerView]:
    """One `ContainerView` per service (replicas share its routes), in file order."""
    views: list[ContainerView] = []
    for order, svc in enumerate(project.services):
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
