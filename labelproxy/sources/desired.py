"""The whole desired state: every container's routes and the static routes, merged per listen key.

`build_desired` is pure and deterministic (the same views in any order give an equal
`DesiredState`). Per listen key:

- Static routes (routes file) come first and always hold their keys; a second static route on
  the same key is in conflict (routes by file, then name).
- Containers are taken oldest first (`created`, then id). The first container declaring a key
  holds it. A later container of the same replica group (`service`: one compose service or
  swarm service) declaring the same alias is a replica: its backend joins the pool.
  Standalone containers (no service) are never replicas of each other. Anything else on
  that key (another alias, another service, another standalone container, or a static route
  already there) is a `conflict` problem on the later route, naming the holder; the holder is
  not disturbed.
- Routes chosen by name (`hostnames`: `ListenKey.names`) with the same bind, family and
  scheme share one listener: each key is a route of its own. A name claimed by two of them
  (the later one is a `conflict`; the first created keeps it), or a route without
  `hostnames` on a listener of named routes (or the other way round), is a conflict too.
- Overlapping binds on one transport and port (`::` and `127.0.0.1`, `0.0.0.0` and `::`
  dual-stack; see `spec.binds_overlap`) are a conflict too, decided the same way, instead of
  a bind that fails (TCP) or silently splits the traffic (UDP).
- Replicas that disagree on scheme or options: the holder's win, and the disagreeing replica
  gets a `conflict` problem saying so (its backend still joins the pool). This happens briefly
  during a rolling update that changes labels; it is worth seeing when it does not go away.
- Containers whose health is `starting` or `unhealthy` keep their claim but are left out of the
  pool: the route stays, possibly with no backends (the data plane then refuses with
  `no_backend` rather than closing the port).
- A route whose target is one of the desired listeners (a host-network container labelled
  `proxy.x.port: N`, which targets 127.0.0.1:N; see `spec.listener_takes`) would relay to
  labelproxy itself, each hop dialling the next: it is a `loop` problem and not served.
  Only IP literals are judged here; names are checked when they are dialled.

A replica group's `RouteSpec.source` is its service name (else the holder container's name), so
a change of holder within a group changes only the backends.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from labelproxy.sources.containers import ContainerView, DiscoveryContext
from labelproxy.sources.labels import declare_container
from labelproxy.spec import (
    Backend,
    DesiredState,
    IPAddress,
    ListenKey,
    Problem,
    RouteOptions,
    RouteSpec,
    Transport,
    bind_address,
    binds_overlap,
    listener_takes,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Claim:
    """Who holds a listen key while the snapshot is being built."""

    spec: RouteSpec
    holder: str
    group: str | None  # replica group of a container route; None for a static route
    origin: str  # the container's name, or the routes file's path
    label: str
    value: str
    backends: set[Backend] = field(default_factory=set)


class _Claims:
    """The keys held so far, indexed by transport and port to find overlapping binds."""

    def __init__(self) -> None:
        self.by_key: dict[ListenKey, _Claim] = {}
        self.by_port: dict[tuple[Transport, int], list[_Claim]] = {}

    def find(self, spec: RouteSpec) -> _Claim | None:
        """The claim on `spec`'s key, else one whose bind overlaps it, else None. Routes
        chosen by name (`ListenKey.names`) share a listener with the same bind and family
        when no name is claimed twice (`sharing`)."""
        held = self.by_key.get(spec.key)
        if held is not None:
            return held
        for claim in self.by_port.get((spec.transport, spec.key.port), ()):
            if sharing(claim.spec, spec):
                continue
            if binds_overlap(claim.spec.key, claim.spec.family, spec.key, spec.family):
                return claim
        return None

    def add(self, claim: _Claim) -> None:
        key = claim.spec.key
        self.by_key[key] = claim
        self.by_port.setdefault((key.transport, key.port), []).append(claim)


def build_desired(
    views: Iterable[ContainerView],
    ctx: DiscoveryContext,
    *,
    static: Iterable[RouteSpec] = (),
    static_problems: Iterable[Problem] = (),
) -> DesiredState:
    """Merge the static routes and every container's routes into one `DesiredState`."""
    problems: list[Problem] = list(static_problems)
    claims = _Claims()
    for spec in sorted(static, key=lambda s: (s.source, s.alias, s.key)):
        holder = f"route {spec.alias!r} of routes file {spec.source}"
        label, value = f"routes.{spec.alias}.port", str(spec.key)
        held = claims.find(spec)
        if held is None:
            claims.add(_Claim(spec, holder, None, spec.source, label, value, set(spec.backends)))
            continue
        message = _held_by(
            str(spec.key), held, overlap=held.spec.key != spec.key, key=spec.key
        )
        problems.append(
            Problem("conflict", spec.alias, spec.source, label, value, message, str(spec.key))
        )
    for view in sorted(views, key=lambda v: (v.created, v.id)):
        declared, found = declare_container(view, ctx)
        problems.extend(found)
        conflicts: dict[tuple[str, str, str, str, bool], tuple[_Claim, list[ListenKey]]] = {}
        for item in sorted(declared, key=lambda d: (d.spec.alias, d.spec.key)):
            spec = item.spec
            held = claims.find(spec)
            if held is None:
                holder = f"route {spec.alias!r} of container {view.name}"
                backends = set(spec.backends) if view.ready else set()
                claims.add(
                    _Claim(spec, holder, view.service, view.name, item.label, item.value, backends)
                )
            elif (
                held.spec.key == spec.key
                and view.service
                and held.group == view.service
                and held.spec.alias == spec.alias
            ):
                if view.ready:
                    held.backends.update(spec.backends)
                if held.spec.scheme != spec.scheme or not _same_options(
                    held.spec.options, spec.options
                ):
                    problems.append(
                        Problem(
                            "conflict", spec.alias, view.name, item.label, item.value,
                            f"replica disagrees with {held.holder} on scheme or options; "
                            "the first container's settings are used",
                        )
                    )  # fmt: skip
            else:
                overlap = held.spec.key != spec.key
                conflict = (spec.alias, item.label, item.value, held.holder, overlap)
                conflicts.setdefault(conflict, (held, []))[1].append(spec.key)
        for (alias, label, value, _, overlap), (held, keys) in conflicts.items():
            message = _held_by(
                _keys_text(keys), held, overlap=overlap, many=len(keys) > 1, key=keys[0]
            )
            logger.debug("conflict: %s %s: %s", view.name, alias, message)
            listen = str(keys[0]) if len(keys) == 1 else ""
            problems.append(Problem("conflict", alias, view.name, label, value, message, listen))
    routes: dict[ListenKey, RouteSpec] = {}
    for key in sorted(claims.by_key):
        claim = claims.by_key[key]
        source = claim.spec.source if claim.group is None else claim.group or claim.spec.source
        routes[key] = dataclasses.replace(
            claim.spec, backends=tuple(sorted(claim.backends)), source=source
        )
    looped, loop_problems = _find_loops(claims)
    for key in looped:
        del routes[key]
    problems.extend(loop_problems)
    return DesiredState(routes=routes, problems=tuple(problems))


def sharing(a: RouteSpec, b: RouteSpec) -> bool:
    """True when `a` and `b` are two routes chosen by name on one listener (same bind,
    family and scheme) that claim no name in common: they share it, no conflict."""
    ka, kb = a.key, b.key
    if not (ka.names and kb.names) or ka.socket_key != kb.socket_key:
        return False
    return a.scheme == b.scheme and not set(ka.names) & set(kb.names)


def _named_clash(key: ListenKey, held: _Claim) -> str | None:
    """What is wrong when a route on `key` meets `held` on one shared listener (None: not
    a clash between routes chosen by name)."""
    theirs, socket_key = held.spec.key.names, key.socket_key
    if socket_key != held.spec.key.socket_key or not (theirs or key.names):
        return None
    where = f"listen {socket_key}"
    if not key.names:
        return (f"{where} is shared by routes chosen by name (hostnames), {held.holder} "
                "among them: a route there needs hostnames too")
    if not theirs:
        return f"{where} is already held by {held.holder}, which has no hostnames"
    common = sorted(set(key.names) & set(theirs))
    if common:
        return f"{where}: hostname {', '.join(common)} is already held by {held.holder}"
    return f"{where} is shared by {held.holder} with another scheme ({held.spec.scheme})"


def _keys_text(keys: list[ListenKey]) -> str:
    return str(keys[0]) if len(keys) == 1 else f"{keys[0]} .. {keys[-1]} ({len(keys)})"


def _held_by(
    where: str, held: _Claim, *, overlap: bool, many: bool = False, key: ListenKey | None = None
) -> str:
    named = _named_clash(key, held) if key is not None else None
    if named is not None:
        return named
    if not overlap:
        return f"listen {where} is already held by {held.holder}"
    same = " (and the same bind on the other ports)" if many else ""
    return f"listen {where} overlaps {held.spec.key}{same}, held by {held.holder}"


def _find_loops(claims: _Claims) -> tuple[set[ListenKey], list[Problem]]:
    """The routes with a target that is one of the desired listeners, and their problems
    (one per alias and label: a port range is reported once)."""
    local = frozenset(
        ip for key in claims.by_key if (ip := bind_address(key)) is not None
    )  # addresses some route binds are this host's own
    found: dict[tuple[str, str, str, str], list[tuple[ListenKey, Backend, _Claim]]] = {}
    for key, claim in sorted(claims.by_key.items()):
        for backend in sorted(set(claim.spec.backends) | claim.backends):
            own = _listener_of(claims, key.transport, backend, local)
            if own is not None:
                origin = backend.container_name or claim.origin
                where = (claim.spec.alias, origin, claim.label, claim.value)
                found.setdefault(where, []).append((key, backend, own))
                break
    looped: set[ListenKey] = set()
    problems: list[Problem] = []
    for (alias, origin, label, value), hits in found.items():
        looped.update(key for key, _, _ in hits)
        key, backend, own = hits[0]
        whose = "its own listener" if own.spec.key == key else f"the listener of {own.holder}"
        first = f"target {backend} is labelproxy's {whose} {own.spec.key}"
        if len(hits) > 1:
            first = f"listen {_keys_text([k for k, _, _ in hits])}: {first} (and so on)"
        message = f"{first}; relaying to it would loop back into labelproxy: not served"
        logger.debug("loop: %s %s: %s", origin, alias, message)
        listen = str(key) if len(hits) == 1 else ""
        problems.append(Problem("loop", alias, origin, label, value, message, listen))
    return looped, problems


def _listener_of(
    claims: _Claims, transport: Transport, backend: Backend, local: frozenset[IPAddress]
) -> _Claim | None:
    """The desired listener a dial to `backend` would land on, if any."""
    for claim in claims.by_port.get((transport, backend.port), ()):
        if listener_takes(claim.spec.key, claim.spec.family, backend.host, local=local):
            return claim
    return None


def _same_options(a: RouteOptions, b: RouteOptions) -> bool:
    """Replicas agree on options; a check that differs only because one replica's image has
    a Docker HEALTHCHECK (`docker`) and the other's not (the default) is no disagreement, nor
    are wake-on-demand settings that differ only in the container they name (the route's
    sleep is the first container's)."""
    if a == b:
        return True
    if a.sleep is not None and b.sleep is not None:  # one container each: same settings?
        mine = dataclasses.replace(
            b.sleep, container_id=a.sleep.container_id,
            container_name=a.sleep.container_name, asleep=a.sleep.asleep,
        )  # fmt: skip
        b = dataclasses.replace(b, sleep=mine)
        if a == b:
            return True
    if "docker" in (a.healthcheck.kind, b.healthcheck.kind):
        return dataclasses.replace(a, healthcheck=b.healthcheck) == b
    return False
