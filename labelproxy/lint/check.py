"""`labelproxy check`: lint labels before (or while) they are served, and print the routes.

Two subjects: the running containers of a Docker engine (listed with docker-py and turned into
views by `discovery.list_once`), or a compose file (`compose.load_compose`, read as Compose
reads it). Either way the views go through the same `desired.build_desired` the proxy uses, so
what `check` prints is what labelproxy would serve: the routes table (listen, scheme, alias,
targets, source, forwarding) and every problem (container or service, label, value, what was
expected). FORWARDING says which path a route takes where labelproxy may program nftables
(`kernel`), or `relay` and why (its `forwarding` field, or an option only the relay has).

Beside the problems, `check` warns about Docker traps that are not label errors:
- a listen port already taken on this host (compose files only: a bind attempt on the route's
  address, 127.0.0.1 or 0.0.0.0, no traffic; a running labelproxy holds its own ports, so the
  warning is expected for routes it already serves);
- a bridge-network container whose target is neither published nor on a network labelproxy
  shares: it is reachable only through its bridge address, which works only when labelproxy runs
  on the Docker host itself (host networking or a plain process, local engine);
- proxy labels set only under `deploy.labels` (Swarm *service* labels, never put on containers,
  so labelproxy does not see them): this one is a problem, not a warning.

A compose file is read by the first Compose reader installed (`composeread`: the `docker
compose` plugin, a standalone `docker-compose`, else the YAML as Compose v2 reads it); one line on
stderr says which. Its services are ordered as Compose creates them, and a conflict between two
services says whether `depends_on` decides the holder or creation order does (`composeorder`);
the routes table then names every service that may hold the port.

Exit status: 1 when there is any problem (label, conflict, address, unreadable input), else 0.
Warnings are printed but do not change the exit status.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from labelproxy.kernel.eligible import eligible
from labelproxy.lint.compose import ComposeError, ComposeProject, load_compose, views_of
from labelproxy.lint.composeorder import settle
from labelproxy.sources.containers import ContainerView, DiscoveryContext
from labelproxy.sources.desired import build_desired
from labelproxy.sources.labels import declare_container
from labelproxy.spec import DesiredState, EdgePolicy, ListenKey, Problem, RouteSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckWarning:
    """A likely mistake that is not a label error: printed, exit status unchanged."""

    source: str
    label: str
    value: str
    message: str

    def __str__(self) -> str:
        what = f"{self.label}={self.value!r}: " if self.label else ""
        return f"{self.source}: {what}{self.message}"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What `check` found about one subject (a compose file or an engine)."""

    subject: str
    state: DesiredState
    warnings: tuple[CheckWarning, ...] = ()
    extra_problems: tuple[Problem, ...] = field(default_factory=tuple)
    undecided: Mapping[ListenKey, tuple[str, ...]] = field(default_factory=dict)
    reader: str = ""  # compose files: which reader, in one line

    @property
    def problems(self) -> tuple[Problem, ...]:
        return (*self.state.problems, *self.extra_problems)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_check(
    *,
    compose_file: Path | None,
    docker_host: str,
    label_prefix: str,
    out: TextIO,
    err: TextIO | None = None,
) -> int:
    """Lint `compose_file`, or the running containers of `docker_host`; print the report on
    `out` and, for a compose file, which reader read it on `err` (default: stderr).

    Returns 0 when there is no problem, 1 on any problem (warnings do not count)."""
    try:
        if compose_file is not None:
            result = check_compose(compose_file, label_prefix=label_prefix)
        else:
            result = check_running(docker_host=docker_host, label_prefix=label_prefix)
    except (ComposeError, CheckError) as exc:
        print(f"labelproxy check: {exc}", file=out)
        return 1
    if result.reader:
        print(f"labelproxy check: {compose_file} read by {result.reader}", file=err or sys.stderr)
    print(render(result), file=out)
    return 0 if result.ok else 1


class CheckError(Exception):
    """The subject cannot be read at all (engine unreachable, discovery disabled)."""


def check_compose(path: Path, *, label_prefix: str, use_cli: bool = True) -> CheckResult:
    """Lint a compose file; raises `ComposeError` when it cannot be read."""
    project = load_compose(path, use_cli=use_cli)
    views = views_of(project)
    own = _own_networks(project)
    ctx = DiscoveryContext(label_prefix=label_prefix, own_networks=own)
    state = build_desired(views, ctx)
    settled = settle(project, views, ctx, state)
    warnings = [
        *(CheckWarning(str(path), "", "", note) for note in project.notes),
        *_port_warnings(state),
        *_network_warnings(views, ctx, own_on_host=not own),
    ]
    return CheckResult(
        subject=f"compose file {path} (project {project.name}, read by {project.reader})",
        state=dataclasses.replace(state, problems=settled.problems),
        warnings=tuple(warnings),
        extra_problems=tuple(_deploy_label_problems(project, label_prefix=label_prefix)),
        undecided=settled.undecided,
        reader=project.detail or project.reader,
    )


def check_running(*, docker_host: str, label_prefix: str) -> CheckResult:
    """Lint the running containers of the engine at `docker_host`."""
    if docker_host == "none":
        raise CheckError("discovery is off (LABELPROXY_DOCKER_HOST=none): use --compose FILE")
    from labelproxy.sources.discovery import DiscoveryError, list_once  # noqa: PLC0415

    try:
        views, ctx = list_once(docker_host=docker_host, label_prefix=label_prefix)
    except DiscoveryError as exc:
        raise CheckError(str(exc)) from None
    own = ctx.own_networks
    state = build_desired(views, ctx)
    local = ctx.daemon_host is None
    return CheckResult(
        subject=f"{len(views)} running containers of {docker_host}",
        state=state,
        warnings=tuple(_network_warnings(views, ctx, own_on_host=local and not own)),
    )


def _own_networks(project: ComposeProject) -> frozenset[str]:
    """The networks of the compose service that runs labelproxy (none: host networking)."""
    for svc in project.services:
        if svc.looks_like_labelproxy:
            return frozenset(svc.networks)
    return frozenset()


def _deploy_label_problems(project: ComposeProject, *, label_prefix: str) -> Iterable[Problem]:
    prefix = label_prefix + "."
    for svc in project.services:
        for key, value in svc.deploy_labels.items():
            if key.startswith(prefix) and key not in svc.labels:
                yield Problem(
                    "label", key[len(prefix) :].split(".", 1)[0], svc.container_name or svc.name,
                    f"deploy.labels.{key}", value,
                    "deploy.labels are Swarm service labels and never reach the containers "
                    "labelproxy reads; expected this label under the service's `labels`",
                )  # fmt: skip


def _port_warnings(state: DesiredState) -> Iterable[CheckWarning]:
    for key, spec in state.routes.items():
        reason = port_in_use(key)
        if reason:
            yield CheckWarning(
                spec.source, "", "",
                f"listen {key} ({spec.alias}) is already in use on this host ({reason}); fine "
                "if a running labelproxy serves this route, else another process holds it",
            )  # fmt: skip


def port_in_use(key: ListenKey) -> str:
    """Why `key` cannot be bound here ("" when it can, or when it is not checkable).

    Only 127.0.0.1 and the wildcards are tried (`::` as 0.0.0.0): a bind attempt, no traffic."""
    host = {"::": "0.0.0.0", "0.0.0.0": "0.0.0.0", "127.0.0.1": "127.0.0.1"}.get(key.bind)
    if host is None:
        return ""
    kind = socket.SOCK_DGRAM if key.transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        if key.transport == "tcp":  # as the listener will: TIME_WAIT leftovers do not count
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, key.port))
        except PermissionError:
            return ""  # a privileged port: says nothing about who holds it
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "address already in use"
            return ""
    return ""


def _network_warnings(
    views: Sequence[ContainerView], ctx: DiscoveryContext, *, own_on_host: bool
) -> Iterable[CheckWarning]:
    """Routes that would dial a container's network address on a network labelproxy is not on."""
    for view in views:
        if view.network_mode == "host" or view.network_mode.startswith("container:"):
            continue
        net_of = {ip: net for net, ip in view.networks.items() if ip}
        declared, _ = declare_container(view, ctx)
        seen: set[tuple[str, str]] = set()
        for item in declared:
            for backend in item.spec.backends:
                net = net_of.get(backend.host)
                if net is None or net in ctx.own_networks or (item.label, net) in seen:
                    continue
                seen.add((item.label, net))
                where = (
                    "works only while labelproxy runs on the Docker host itself (host "
                    "networking, local engine, not Docker Desktop)"
                    if own_on_host
                    else "labelproxy is not on that network, so it cannot reach it"
                )
                yield CheckWarning(
                    view.name, item.label, item.value,
                    f"target port {backend.port} is neither published nor on a network "
                    f"labelproxy shares: it would be dialled on network {net} ({where}); "
                    "publish the port, put labelproxy on that network, or set proxy.network",
                )  # fmt: skip


def forwarding_of(spec: RouteSpec) -> str:
    """`kernel`, or `relay: <why>`: the path a route takes where nftables is usable."""
    verdict = eligible(spec, policy=EdgePolicy())
    return "kernel" if verdict.kernel else f"relay: {verdict.reason}"


def render(result: CheckResult) -> str:
    """The report: routes table, problems, warnings and a one-line summary."""
    lines = [f"labelproxy check: {result.subject}", ""]
    rows = [("LISTEN", "SCHEME", "ALIAS", "TARGETS", "CHECK", "SOURCE", "FORWARDING")]
    for key in sorted(result.state.routes):
        spec = result.state.routes[key]
        targets = ",".join(str(b) for b in spec.backends) or "(no ready backend)"
        source = spec.source.removeprefix("compose:").removeprefix("swarm:")
        if key in result.undecided:
            source += f" (or {', '.join(result.undecided[key])}: whichever is created first)"
        check = str(spec.options.healthcheck)
        rows.append(
            (str(key), spec.scheme, spec.alias, targets, check, source, forwarding_of(spec))
        )
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines.extend(
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
        )
        lines.append("(FORWARDING kernel: where labelproxy may program nftables, see "
                     "LABELPROXY_FORWARDING; the relay otherwise)")
    else:
        lines.append("no routes")
    if result.problems:
        lines += ["", "PROBLEMS"]
        lines += [f"  [{p.kind}] {p}" for p in result.problems]
    if result.warnings:
        lines += ["", "WARNINGS"]
        lines += [f"  {w}" for w in result.warnings]
    n_routes, n_problems, n_warnings = (
        len(result.state.routes), len(result.problems), len(result.warnings)
    )  # fmt: skip
    lines += [
        "",
        f"{n_routes} route(s), {n_problems} problem(s), {n_warnings} warning(s)"
        + ("" if n_problems else ": OK"),
    ]
    return "\n".join(lines)
