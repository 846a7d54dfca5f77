"""The whole desired state: every container's routes and the static routes, merged per listen key.

`build_desired` is pure and deterministic (the same views in any order give an equal
`DesiredState`). Per listen key:

- Static routes (routes file) come first and always hold their keys; a second static route on
  the same key is in conflict (routes by file, then name).
- Containers are taken oldest first (`created`, then id). The first container declaring a key
  holds it. A later container with the same alias and the same replica group (`service`, or both
  without one) is a replica: its backend joins the pool. Anything else on that key (another
  alias, another service, or a static route already there) is a `conflict` problem on the
  later route, naming the holder; the holder is not disturbed.
- Replicas that disagree on scheme or options: the holder's win, and the disagreeing replica
  gets a `conflict` problem saying so (its backend still joins the pool). This happens briefly
  during a rolling update that changes labels; it is worth seeing when it does not go away.
- Containers whose health is `starting` or `unhealthy` keep their claim but are left out of the
  pool: the route stays, possibly with no backends (the data plane then refuses with
  `no_backend` rather than closing the port).

A replica group's `RouteSpec.source` is its service name (else the holder container's name), so
a change of holder within a group changes only the backends.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from labelproxy.containers import ContainerView, DiscoveryContext
from labelproxy.labels import declare_container
from labelproxy.spec import Backend, DesiredState, ListenKey, Problem, RouteSpec

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Claim:
    """Who holds a listen key while the snapshot is being built."""

    spec: RouteSpec
    holder: str
    group: str | None  # replica group of a container route; None for a static route
    backends: set[Backend] = field(default_factory=set)


def build_desired(
    views: Iterable[ContainerView],
    ctx: DiscoveryContext,
    *,
    static: Iterable[RouteSpec] = (),
    static_problems: Iterable[Problem] = (),
) -> DesiredState:
    """Merge the static routes and every container's routes into one `DesiredState`."""
    problems: list[Problem] = list(static_problems)
    claims: dict[ListenKey, _Claim] = {}
    for spec in sorted(static, key=lambda s: (s.source, s.alias, s.key)):
        holder = f"route {spec.alias!r} of routes file {spec.source}"
        held = claims.get(spec.key)
        if held is None:
            claims[spec.key] = _Claim(spec, holder, None, set(spec.backends))
            continue
        problems.append(
            Problem(
                "conflict", spec.alias, spec.source, f"routes.{spec.alias}.port", str(spec.key),
                f"listen {spec.key} is already held by {held.holder}", listen=str(spec.key),
            )
        )  # fmt: skip
    for view in sorted(views, key=lambda v: (v.created, v.id)):
        declared, found = declare_container(view, ctx)
        problems.extend(found)
        conflicts: dict[tuple[str, str, str, str], list[ListenKey]] = {}
        for item in sorted(declared, key=lambda d: (d.spec.alias, d.spec.key)):
            spec = item.spec
            held = claims.get(spec.key)
            if held is None:
                holder = f"route {spec.alias!r} of container {view.name}"
                backends = set(spec.backends) if view.ready else set()
                claims[spec.key] = _Claim(spec, holder, view.service, backends)
            elif held.group == view.service and held.spec.alias == spec.alias:
                if view.ready:
                    held.backends.update(spec.backends)
                if (held.spec.scheme, held.spec.options) != (spec.scheme, spec.options):
                    problems.append(
                        Problem(
                            "conflict", spec.alias, view.name, item.label, item.value,
                            f"replica disagrees with {held.holder} on scheme or options; "
                            "the first container's settings are used",
                        )
                    )  # fmt: skip
            else:
                conflicts.setdefault((spec.alias, item.label, item.value, held.holder), []).append(
                    spec.key
                )
        for (alias, label, value, holder), keys in conflicts.items():
            where = str(keys[0]) if len(keys) == 1 else f"{keys[0]} .. {keys[-1]} ({len(keys)})"
            message = f"listen {where} is already held by {holder}"
            logger.debug("conflict: %s %s: %s", view.name, alias, message)
            listen = str(keys[0]) if len(keys) == 1 else ""
            problems.append(Problem("conflict", alias, view.name, label, value, message, listen))
    routes: dict[ListenKey, RouteSpec] = {}
    for key in sorted(claims):
        claim = claims[key]
        source = claim.spec.source if claim.group is None else claim.group or claim.spec.source
        routes[key] = dataclasses.replace(
            claim.spec, backends=tuple(sorted(claim.backends)), source=source
        )
    return DesiredState(routes=routes, problems=tuple(problems))
