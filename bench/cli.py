"""`python -m bench`: parse the options, run the benchmark, print and write the report.

Exit status: 0 when every selected measurement ran, 1 when any failed (the report lists the
errors), 2 when the benchmark could not run at all (a peer missing and not installable).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from bench import convergence, netns, pyspy
from bench.measure import Env, Plan
from bench.procs import BenchError, Children, free_port, raise_nofile_limit
from bench.report import SECTION_KEYS, Results, render_markdown, to_json
from bench.run import observed_threads, restart_target, run_data_plane, start_targets
from bench.targets import (
    ALL_TARGETS,
    DEFAULT_TARGETS,
    KERNEL_TARGET,
    StartContext,
    default_labelproxy_cmd,
)
from bench.toolchain import (
    build_tools,
    default_cache_dir,
    find_missing,
    install_peers,
    machine_header,
)
from bench.upstreams import TCP_ROUTES, UDP_ROUTES, start_upstreams

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every section once, tiny loads")
    parser.add_argument(
        "--only",
        type=_csv,
        default=list(SECTION_KEYS),
        help=f"comma list of sections: {','.join(SECTION_KEYS)}",
    )
    parser.add_argument("--skip", type=_csv, default=[], help="comma list of sections to skip")
    parser.add_argument(
        "--targets",
        type=_csv,
        default=list(DEFAULT_TARGETS),
        help=f"comma list of targets: {','.join(ALL_TARGETS)} (default: "
        f"{','.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument(
        "--labelproxy-cmd",
        default=shlex.join(default_labelproxy_cmd()),
        help="command that runs labelproxy (default: %(default)s)",
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    parser.add_argument(
        "--skip-docker", action="store_true", help="skip the convergence section (it needs dockerd)"
    )
    parser.add_argument("--containers", type=int, help="containers for the initial sync")
    parser.add_argument("--starts", type=int, help="docker starts per repetition")
    parser.add_argument(
        "--no-install", action="store_true", help="never apt-get install missing peers"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record labelproxy with py-spy during each data-plane measurement "
        "and write profile-<section>.md to --out (needs py-spy)",
    )
    parser.add_argument(
        "--netns",
        action="store_true",
        help="run every target inside a fresh network namespace of the bench's own (needed "
        "by labelproxy-kernel, which programs nftables; the convergence section is skipped)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    unknown = [s for s in args.only + args.skip if s not in SECTION_KEYS]
    unknown += [t for t in args.targets if t not in ALL_TARGETS]
    if unknown:
        parser.error(f"unknown section or target: {', '.join(unknown)}")
    if args.profile and pyspy.PROFILED_TARGET not in args.targets:
        parser.error(f"--profile records {pyspy.PROFILED_TARGET}: add it to --targets")
    if KERNEL_TARGET in args.targets and not args.netns:
        parser.error(f"{KERNEL_TARGET} programs nftables, never in the host's network "
                     "namespace: add --netns (the whole bench then runs in one of its own)")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    overrides: dict[str, int] = {}
    if args.reps:
        overrides["reps"] = args.reps
    if args.containers:
        overrides["containers"] = args.containers
    if args.starts:
        overrides["starts"] = args.starts
    if overrides:
        plan = Plan(**{**{f: getattr(plan, f) for f in Plan.__dataclass_fields__}, **overrides})
    return plan


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s bench %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    py_spy = pyspy.find_py_spy() if args.profile else None
    if args.profile and py_spy is None:
        logger.error("--profile needs py-spy, which was not found: %s", pyspy.INSTALL_HINT)
        return 2
    sections = [s for s in SECTION_KEYS if s in args.only and s not in args.skip]
    if (args.skip_docker or args.netns) and "convergence" in sections:
        sections.remove("convergence")
    targets = [t for t in ALL_TARGETS if t in args.targets]
    plan = make_plan(args)
    raise_nofile_limit()
    try:
        missing = find_missing()
        if missing and not args.no_install:
            install_peers(missing)
            missing = find_missing()
        if missing:
            raise BenchError(f"missing programs from Debian packages: {', '.join(missing)}")
        tools = build_tools(cache_dir=default_cache_dir())
        if args.netns and not netns.inside():
            return netns.reexec(list(sys.argv[1:] if argv is None else argv), repo=REPO)
    except BenchError as exc:
        logger.error("%s", exc)
        return 2
    header = machine_header(repo=REPO, command=list(sys.argv[1:] if argv is None else argv))
    header["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header["plan"] = (
        f"{plan.reps} repetitions; iperf3 "
        + (f"-n {plan.bulk_bytes}" if plan.bulk_bytes else f"-t {plan.bulk_seconds}")
        + f"; short connections {plan.short_seconds}s; wrk {plan.wrk_seconds}s; ping-pong "
        f"{plan.pingpong_count}; UDP {plan.udp_count} datagrams, {plan.udp_rtt_count} echoes; "
        f"{plan.hold_conns} idle connections; {plan.starts} docker starts; "
        f"{plan.containers} containers"
    )
    results = Results(targets=targets)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="labelproxy-bench-"))
    children = Children(log_dir=workdir)
    labelproxy_cmd = shlex.split(args.labelproxy_cmd)
    notes: dict[str, str] = {}
    try:
        upstream = {route: free_port() for route in TCP_ROUTES + UDP_ROUTES}
        upstreams = start_upstreams(children, tools=tools, workdir=workdir, ports=upstream)
        ctx = StartContext(
            children=children,
            workdir=workdir,
            upstream=upstream,
            repo=REPO,
            labelproxy_cmd=labelproxy_cmd,
            server=tools.server,
        )
        running = start_targets(ctx, targets, results)
        notes = {t.name: t.note for t in running}
        env = Env(plan=plan, tools=tools, upstreams=upstreams, children=children)
        recorder = pyspy.Recorder(py_spy, children, workdir) if py_spy else None
        run_data_plane(
            env,
            running,
            sections,
            results,
            restart=lambda target: restart_target(ctx, target),
            record=recorder.record if recorder else None,
        )
        if recorder is not None:
            try:
                for summary in pyspy.write_summaries(args.out, recorder.raw, repo=REPO):
                    logger.info("profile written to %s", summary)
            except OSError as exc:
                results.errors.append(f"profile summaries not written: {exc}")
            if pyspy.PROFILED_TARGET in notes:
                notes[pyspy.PROFILED_TARGET] += (
                    f"; recorded by py-spy at {pyspy.RATE} Hz during the data-plane "
                    "measurements (its figures include the sampling overhead)"
                )
        for target in running:
            observed = observed_threads(target)
            notes[target.name] += f"; {observed}" if observed else ""
        children.stop_all()
        if "convergence" in sections:
            convergence.run(
                plan=plan,
                workdir=workdir,
                repo=REPO,
                labelproxy_cmd=labelproxy_cmd,
                results=results,
            )
    finally:
        children.stop_all()
        if args.keep_workdir:
            logger.info("work directory kept: %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for name in targets:
        notes.setdefault(name, "did not start")
    header["plan"] += f"; run took {time.monotonic() - began:.0f}s"
    text = render_markdown(header=header, notes=notes, results=results, sections=sections)
    print(text)
    write_results(args.out, text, to_json(header=header, notes=notes, results=results))
    return 1 if results.errors else 0


def write_results(out: Path, text: str, data: dict[str, object]) -> None:
    with contextlib.suppress(OSError):
        out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        for name in ("latest", stamp):
            (out / f"{name}.md").write_text(text + "\n")
            (out / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        logger.info("results written to %s/latest.md and latest.json", out)
