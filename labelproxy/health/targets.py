"""The checker's targets from the desired routes: one `HealthTarget` per route, a port range
checked once.

`health_targets(routes)` gives every route its target (checked or not: passive ejection needs
them all). The ports of one range are routes of their own (one alias of one container or
routes-file entry: the same alias, source, transport and bind, and the same check), but
checking each would cost one check per port per backend: 5,000 ports would be 5,000 checks
per interval per backend. So the range's lowest listen port is checked (each backend on the
target port it maps to) and every other port of the range `follows` it: its backends take the
result of the same container's backend there. A port whose backends do not all map to one of
the first port's (same host and container, same offset) is checked on its own. Pure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from labelproxy.health.views import HealthTarget
from labelproxy.healthcheck import HealthCheck
from labelproxy.spec import Backend, ListenKey, RouteSpec, Transport

logger = logging.getLogger(__name__)

_Group = tuple[str, str, Transport, str, HealthCheck]


def health_targets(routes: Mapping[ListenKey, RouteSpec]) -> dict[ListenKey, HealthTarget]:
    """Every route's target, the ports of a range following its first port."""
    targets: dict[ListenKey, HealthTarget] = {}
    groups: dict[_Group, list[RouteSpec]] = {}
    for key, spec in routes.items():
        check = spec.options.healthcheck
        targets[key] = HealthTarget(check, spec.backends, route=spec.alias)
        if check.active:
            group = (spec.alias, spec.source, key.transport, key.bind, check)
            groups.setdefault(group, []).append(spec)
    for members in groups.values():
        if len(members) < 2:
            continue
        first = min(members, key=lambda spec: spec.key.port)
        owners = {range_owner(first.key, b) for b in first.backends}
        for spec in members:
            if spec is first or not all(range_owner(spec.key, b) in owners for b in spec.backends):
                continue
            targets[spec.key] = HealthTarget(
                spec.options.healthcheck, spec.backends, route=spec.alias, follows=first.key
            )
    return targets


def range_owner(key: ListenKey, backend: Backend) -> tuple[str, str, str, int]:
    """What matches a backend across the ports of a range (as `checker` matches them)."""
    return backend.host, backend.container_id, backend.container_name, backend.port - key.port
