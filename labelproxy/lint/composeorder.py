"""Which service of a compose file holds a port that two of them claim: creation order.

At run time the oldest container holds a contested listen key and every later claimant gets a
`conflict` problem (`desired.build_desired`). Before `up` there are no creation times, but
Compose creates a service's containers after those of the services it depends on (`depends_on`,
`links`, `network_mode: service:X`, `volumes_from`, directly or not) and all others in parallel.
`compose.views_of` orders the views that way, so for two services whose routes conflict:

- one depends on the other: the dependency is created first and holds the port; the conflict
  says so (a prediction the runtime will keep);
- neither depends on the other: creation order decides and is unknown before `up`; the conflict
  says so and names both services, and `Settled.undecided` gives, per route, every other
  service that may hold it instead.

Conflicts are found by building the desired state of each pair of services with the proxy's own
rules, so whatever the runtime calls a conflict (same key, overlapping binds) counts, and the
replicas of one service (one view, one replica group) never do.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from labelproxy.lint.compose import ComposeProject
from labelproxy.sources.containers import ContainerView, DiscoveryContext
from labelproxy.sources.desired import build_desired
from labelproxy.sources.labels import declare_container
from labelproxy.spec import DesiredState, ListenKey, Problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settled:
    """The problems with their creation-order notes, and the routes whose holder is open."""

    problems: tuple[Problem, ...]
    undecided: Mapping[ListenKey, tuple[str, ...]]  # route -> the other services that may hold it


def settle(
    project: ComposeProject,
    views: Sequence[ContainerView],
    ctx: DiscoveryContext,
    state: DesiredState,
) -> Settled:
    """Explain, for every conflict between two services of `project`, who holds the port."""
    service_of = {v.name: v.service.rsplit("/", 1)[-1] for v in views}
    ports: dict[str, set[tuple[str, int]]] = {}
    for view in views:
        declared, _ = declare_container(view, ctx)
        if declared:
            ports[view.name] = {(d.spec.key.transport, d.spec.key.port) for d in declared}
    claimants = [v for v in views if v.name in ports]
    solo = {v.name: _conflicts(build_desired([v], ctx)) for v in claimants}
    notes: dict[Problem, str] = {}
    undecided: dict[ListenKey, set[str]] = {}
    for i, first in enumerate(claimants):
        for second in claimants[i + 1 :]:
            if not ports[first.name] & ports[second.name]:
                continue
            pair = build_desired([first, second], ctx)
            new = _conflicts(pair) - solo[first.name] - solo[second.name]
            if not new:
                continue
            if service_of[first.name] in project.depends_on(service_of[second.name]):
                note = (
                    f"; {second.name} depends on {first.name}, so Compose creates {first.name} "
                    "first and it holds the port"
                )
            else:
                note = (
                    f"; creation order decides: neither of {first.name} and {second.name} "
                    "depends on the other, so Compose creates them in parallel and the one "
                    "created first holds the port (the other gets this conflict); make one "
                    "depend on the other, or give one of them another port"
                )
                earlier = dataclasses.replace(second, created=first.created - 1)
                swapped = build_desired([earlier, first], ctx)
                for key in pair.routes.keys() | swapped.routes.keys():
                    if pair.routes.get(key) != swapped.routes.get(key):
                        undecided.setdefault(key, set()).update((first.name, second.name))
            for problem in new:
                notes[problem] = note
    problems = tuple(
        dataclasses.replace(p, message=p.message + notes[p]) if p in notes else p
        for p in state.problems
    )
    name_of_group = {v.service: v.name for v in views}
    order = {v.name: i for i, v in enumerate(views)}
    rows: dict[ListenKey, tuple[str, ...]] = {}
    for key, spec in state.routes.items():
        if key not in undecided:
            continue
        holder = name_of_group.get(spec.source, "")
        claimants_of_key = undecided[key] | {holder}
        others = {  # a service created after another claimant (it depends on it) never holds
            name for name in claimants_of_key - {holder}
            if not {service_of.get(c, c) for c in claimants_of_key}
            & project.depends_on(service_of.get(name, name))
        }  # fmt: skip
        if others:
            rows[key] = tuple(sorted(others, key=order.__getitem__))
    return Settled(problems=problems, undecided=rows)


def _conflicts(state: DesiredState) -> frozenset[Problem]:
    return frozenset(p for p in state.problems if p.kind == "conflict")
