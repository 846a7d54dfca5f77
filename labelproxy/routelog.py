"""The reconciler's INFO lines: one per route, and one per port range rather than per port.

A container labelled `proxy.x.port: 20000-24999` is 5,000 listeners; starting it must not
write 5,000 "route up" lines. `runs` groups specs into runs of consecutive ports of one
alias (same scheme, bind address and source), and `log_runs` writes one INFO record per run:
a single port reads as before (`listen=tcp://[::]:2222`), a run names its first and last
port and how many there are (`listen=tcp://[::]:20000-24999`, message `route up (5000
ports)`). Each port of a run is logged at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from labelproxy.spec import RouteSpec

logger = logging.getLogger(__name__)


def runs(specs: Iterable[RouteSpec]) -> list[tuple[RouteSpec, ...]]:
    """`specs` sorted by listen key and cut into runs of consecutive ports of one route."""
    out: list[list[RouteSpec]] = []
    for spec in sorted(specs, key=lambda s: s.key):
        if out and _continues(out[-1][-1], spec):
            out[-1].append(spec)
        else:
            out.append([spec])
    return [tuple(run) for run in out]


def _continues(prev: RouteSpec, spec: RouteSpec) -> bool:
    return (
        spec.key.port == prev.key.port + 1
        and (spec.alias, spec.scheme, spec.key.transport, spec.key.bind, spec.source)
        == (prev.alias, prev.scheme, prev.key.transport, prev.key.bind, prev.source)
    )


def log_runs(
    message: str, specs: Iterable[RouteSpec], *, action: str, level: int = logging.INFO
) -> None:
    """One `level` record per run of `specs` (see the module doc), each port at DEBUG."""
    if not logger.isEnabledFor(level):
        return
    for run in runs(specs):
        if len(run) == 1:
            logger.log(level, message, extra=context(run, action=action))
            continue
        logger.log(level, "%s (%d ports)", message, len(run), extra=context(run, action=action))
        if logger.isEnabledFor(logging.DEBUG):
            for spec in run:
                logger.debug("%s (port of a range)", message, extra=context((spec,), action=action))


def context(run: Sequence[RouteSpec], *, action: str) -> dict[str, str]:
    """The log context of one route, or of a run of ports of one route."""
    first, last = run[0], run[-1]
    listen = str(first.key)
    dst = ",".join(str(b) for b in first.backends) or "-"
    if len(run) > 1:
        listen = f"{listen}-{last.key.port}"
        last_dst = ",".join(str(b) for b in last.backends) or "-"
        dst = f"{dst} .. {last_dst}"
    containers = sorted({b.container_name for s in (first, last) for b in s.backends
                         if b.container_name})  # fmt: skip
    return {
        "route": first.alias,
        "protocol": first.scheme,
        "listen": listen,
        "dst": dst,
        "container": ",".join(containers),
        "action": action,
    }
