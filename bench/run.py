"""The order of a benchmark run: upstreams, targets, then each section interleaving targets.

`run_data_plane` repeats every selected section `plan.reps` times; within a repetition it goes
round robin over the running targets (the starting target rotates each repetition), so slow
drifts of the machine spread over all targets instead of favouring one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import measure, sni
from bench.measure import Env, Measured
from bench.procs import BenchError, process_tree
from bench.report import SECTIONS, Results, Section
from bench.sniconf import ROUTE as SNI_ROUTE
from bench.targets import STARTERS, StartContext, Target

logger = logging.getLogger(__name__)

Measurement = Callable[[Env, Target], Measured]
# wraps one measurement of (section, target), e.g. a profiler recording it (--profile)
Recording = Callable[[str, Target], contextlib.AbstractContextManager[None]]


@dataclass(frozen=True, slots=True)
class SectionRun:
    """The measurements of a section and which targets they apply to."""

    measurements: tuple[Measurement, ...]
    needs_udp: bool = False
    needs_proxy: bool = False
    # each repetition runs on a freshly started target: memory freed by an earlier repetition
    # would otherwise be reused and hide what new connections cost
    fresh_process: bool = False
    route: str = ""  # a route only some targets have (the others: n/a)


def _bulk(streams: int) -> Measurement:
    return lambda env, target: measure.tcp_bulk(env, target, streams=streams)


def _http(*, close: bool) -> Measurement:
    return lambda env, target: measure.http(env, target, close=close)


SECTION_RUNS: dict[str, SectionRun] = {
    "tcp_bulk": SectionRun((_bulk(1), _bulk(8))),
    "short_conns": SectionRun((measure.short_conns,)),
    "http": SectionRun((_http(close=False), _http(close=True))),
    "pingpong": SectionRun((measure.pingpong,)),
    "udp": SectionRun((measure.udp_flood, measure.udp_rtt), needs_udp=True),
    "memory": SectionRun((measure.idle_memory,), needs_proxy=True, fresh_process=True),
    "sni": SectionRun((sni.sni_conns, sni.sni_pingpong), route=SNI_ROUTE),
}
NO_PROXY_METRICS = (
    "tcp_bulk_1_cpu_s_per_gb",
    "tcp_bulk_8_cpu_s_per_gb",
    "short_conns_user_us",
    "short_conns_sys_us",
    "pingpong_msg_user_us",
    "pingpong_msg_sys_us",
    "sni_conns_user_us",
    "sni_conns_sys_us",
)


def start_targets(ctx: StartContext, names: list[str], results: Results) -> list[Target]:
    """Start each target; one that fails is reported and left out of every section."""
    running = []
    for name in names:
        logger.info("starting %s", name)
        try:
            running.append(STARTERS[name](ctx))
        except (BenchError, OSError) as exc:
            logger.error("%s failed to start: %s", name, exc)
            results.errors.append(f"{name} failed to start: {exc}")
            for section in SECTIONS:
                results.skip(section=section, target=name, reason="did not start")
    return running


def restart_target(ctx: StartContext, target: Target) -> Target:
    """Stop `target`'s processes by PID and start a new instance of it."""
    for proc in [p for p in ctx.children.procs if p.pid in target.roots]:
        ctx.children.stop(proc)
    return STARTERS[target.name](ctx)


def observed_threads(target: Target) -> str:
    """`P processes, T threads` of a target's process tree right now ("" for direct)."""
    if not target.roots:
        return ""
    pids = process_tree(target.roots)
    threads = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    threads += int(line.split()[1])
    return f"{len(pids)} process(es), {threads} thread(s) observed after the data-plane sections"


def _section(key: str) -> Section:
    return next(section for section in SECTIONS if section.key == key)


def run_data_plane(
    env: Env,
    targets: list[Target],
    sections: list[str],
    results: Results,
    *,
    restart: Callable[[Target], Target] | None = None,
    record: Recording | None = None,
) -> None:
    """Run `sections` over `targets`; `targets` is updated in place when one is restarted.
    Each measurement runs inside `record(section, target)` when given."""
    for target in targets:
        if not target.roots:
            for metric_key in NO_PROXY_METRICS:
                results.not_applicable.setdefault(metric_key, {})[target.name] = "n/a (no proxy)"
    for key in sections:
        run = SECTION_RUNS.get(key)
        if run is None:
            continue
        section = _section(key)
        eligible = []
        for target in targets:
            if run.needs_udp and not target.udp:
                results.skip(section=section, target=target.name, reason="n/a (no UDP)")
            elif run.needs_proxy and not target.roots:
                results.skip(section=section, target=target.name, reason="n/a (no proxy)")
            elif run.route and run.route not in target.ports:
                results.skip(section=section, target=target.name, reason="n/a (not set up)")
            else:
                eligible.append(target)
        for rep in range(env.plan.reps):
            shift = rep % max(1, len(eligible))
            for scheduled in eligible[shift:] + eligible[:shift]:
                logger.info("%s rep %d/%d: %s", key, rep + 1, env.plan.reps, scheduled.name)
                target = scheduled
                if run.fresh_process and restart is not None:
                    try:
                        target = restart(scheduled)
                    except (BenchError, OSError) as exc:
                        results.error(section=key, target=scheduled.name, rep=rep, message=str(exc))
                        continue
                    targets[targets.index(scheduled)] = target
                    eligible[eligible.index(scheduled)] = target
                for measurement in run.measurements:
                    recording = record(key, target) if record else contextlib.nullcontext()
                    try:
                        with recording:
                            measured = measurement(env, target)
                    except (BenchError, OSError, KeyError, ValueError) as exc:
                        logger.error("%s / %s failed: %s", key, target.name, exc)
                        results.error(section=key, target=target.name, rep=rep, message=str(exc))
                        continue
                    results.add(
                        section=key,
                        target=target.name,
                        rep=rep,
                        values=measured.values,
                        raw=measured.raw,
                    )
