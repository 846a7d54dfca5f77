"""Smoke test of the side-by-side benchmark: `python -m bench --quick` runs and reports.

It runs the real benchmark (real peers, real labelproxy, the C load generators, a private
dockerd for the convergence section when dockerd is installed) with tiny loads, and checks what
a user sees: exit status 0, a Markdown table for every metric with a row for every target, and
the report written to the results directory. Two short runs check the optional parts: the
reference floor `pyfloor` (only when named, never a peer) and `--profile` (when py-spy is
installed). It asserts no timing: speed belongs in bench/.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.pyspy import find_py_spy
from bench.report import SECTIONS, Results, render_metric, render_summary
from bench.targets import DEFAULT_TARGETS
from bench.toolchain import find_missing
from tests.support.dockerd import missing_requirements

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 240


def _require_peers() -> None:
    missing = find_missing()
    if not missing:
        return
    message = f"benchmark peers missing: {', '.join(missing)} (apt-get install them)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _tables(markdown: str) -> dict[str, str]:
    """Metric table title -> its text, for every `####` table in the report."""
    blocks = re.split(r"^#### ", markdown, flags=re.MULTILINE)[1:]
    return {block.splitlines()[0]: block for block in blocks}


def _quick(tmp_path: Path, *extra: str) -> str:
    """`python -m bench --quick --no-install` with `extra` arguments; its standard output,
    once it exited 0."""
    args = [sys.executable, "-m", "bench", "--quick", "--no-install", "--out", str(tmp_path),
            *extra]  # fmt: skip
    done = subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_quick_benchmark_prints_every_target_in_every_table(tmp_path: Path) -> None:
    _require_peers()
    with_docker = missing_requirements() is None
    out = _quick(tmp_path, *(() if with_docker else ("--skip-docker",)))
    assert out.startswith("# labelproxy side-by-side benchmark")
    assert "- machine: " in out and "- command: `python" in out
    assert "### Errors" not in out

    tables = _tables(out)
    expected = [
        metric.title
        for section in SECTIONS
        if with_docker or section.key != "convergence"
        for metric in section.metrics
    ]
    assert [title.split(" (")[0] for title in tables] == expected
    for title, table in tables.items():
        assert "| target | median | min-max | vs direct | vs best peer |" in table
        for target in DEFAULT_TARGETS:
            assert re.search(rf"^\| {target} \| \S", table, re.MULTILINE), (title, target)

    # labelproxy measured every section it takes part in (a number, not n/a or an error; the
    # quick run holds only 100 connections, so memory per connection may be a little negative)
    for title, table in tables.items():
        row = re.search(r"^\| labelproxy \| ([^|]+)\|", table, re.MULTILINE)
        assert row is not None and re.match(r"-?[\d,.]+ $", row.group(1)), (title, row)

    saved = (tmp_path / "latest.md").read_text()
    assert saved.strip() == out.strip()
    assert (tmp_path / "latest.json").is_file()


def test_reference_floor_runs_only_when_named_and_is_no_peer(tmp_path: Path) -> None:
    _require_peers()
    out = _quick(tmp_path, "--targets", "direct,pyfloor", "--only", "short_conns,pingpong")
    assert "  - pyfloor: reference floor, not a peer" in out
    tables = _tables(out)
    assert len(tables) == 7  # the short_conns and pingpong metrics
    for title, table in tables.items():
        rows = re.findall(r"^\| (\w+) \|", table, re.MULTILINE)
        assert rows == ["target", "direct", "pyfloor"], (title, rows)
        row = re.search(r"^\| pyfloor \| ([-\d,.]+) \|.* \| n/a \|$", table, re.MULTILINE)
        assert row is not None, (title, table)  # measured, and never a "best peer"


def test_the_idle_route_targets_run_with_their_1000_routes_up(tmp_path: Path) -> None:
    """`labelproxy-routes` and `labelproxy-checked` start labelproxy with 1,000 idle routes
    (checked or not), wait until all are up and their backends ready, and are measured."""
    _require_peers()
    out = _quick(tmp_path, "--targets", "labelproxy-routes,labelproxy-checked",
                 "--only", "short_conns")
    assert "1,000 idle routes with checks off" in out
    assert "1,000 idle routes with the default active check" in out
    tables = _tables(out)
    assert len(tables) == 3  # the short_conns metrics
    for title, table in tables.items():
        for target in ("labelproxy-routes", "labelproxy-checked"):
            row = re.search(rf"^\| {target} \| ([-\d,.]+) \|", table, re.MULTILINE)
            assert row is not None, (title, target, table)  # measured


def test_the_reference_floor_is_never_the_best_peer() -> None:
    results = Results(targets=["haproxy", "pyfloor"])
    for target, rate in (("haproxy", 100.0), ("pyfloor", 200.0)):
        results.add(
            section="short_conns", target=target, rep=0, values={"short_conns_per_s": rate}, raw={}
        )
    metric = next(
        m for section in SECTIONS for m in section.metrics if m.key == "short_conns_per_s"
    )
    table = "\n".join(render_metric(metric, results))
    assert "| haproxy | 100 | 100-100 | n/a | 1.00x |" in table
    assert "| pyfloor | 200 | 200-200 | n/a | 2.00x |" in table


def test_profile_writes_a_summary_per_section(tmp_path: Path) -> None:
    _require_peers()
    if find_py_spy() is None:
        pytest.skip("py-spy is not installed (pip install py-spy)")
    out = _quick(tmp_path, "--targets", "labelproxy", "--only", "short_conns,pingpong",
                 "--profile")
    assert "recorded by py-spy" in out
    for section in ("short_conns", "pingpong"):
        summary = (tmp_path / f"profile-{section}.md").read_text()
        assert summary.startswith(f"# labelproxy profile: {section}")
        assert "## Data-plane thread (labelproxy-tcp)" in summary
        assert "## Whole process" in summary
        assert (tmp_path / f"profile-{section}.raw").is_file()


def test_summary_has_one_row_per_measurement_with_labelproxy_ratios() -> None:
    results = Results(targets=["direct", "haproxy", "nginx", "labelproxy"])
    rates = {"direct": [300.0], "haproxy": [100.0, 110.0, 90.0], "nginx": [120.0]}
    rates["labelproxy"] = [60.0]
    for target, values in rates.items():
        for rep, rate in enumerate(values):
            results.add(
                section="short_conns",
                target=target,
                rep=rep,
                values={"short_conns_per_s": rate},
                raw={},
            )
    lines = render_summary(results, ["short_conns", "pingpong"])
    assert (
        lines[0]
        == "| measurement | direct | HAProxy | nginx | labelproxy | vs HAProxy | vs best peer |"
    )
    rows = [line for line in lines[2:] if line]
    assert rows == [
        "| Short connections: connect, 64 B, echo, close; 50 clients (conn/s, higher is better)"
        " | 300 | 100 | 120 | **60.0** | 0.60x | 0.50x |"
    ]  # medians; the best peer is nginx; metrics labelproxy has no sample for are left out


def test_summary_compares_the_relay_with_and_without_checked_routes() -> None:
    """`labelproxy-routes` (the relay plus 1,000 idle routes, checks off) and
    `labelproxy-checked` (the same routes with default checks) get their own columns and
    ratios to the plain relay of the same run."""
    results = Results(targets=["direct", "haproxy", "labelproxy", "labelproxy-routes",
                               "labelproxy-checked"])
    for target, rate in {"direct": 300.0, "haproxy": 100.0, "labelproxy": 80.0,
                         "labelproxy-routes": 84.0, "labelproxy-checked": 76.0}.items():
        results.add(section="short_conns", target=target, rep=0,
                    values={"short_conns_per_s": rate}, raw={})
    lines = render_summary(results, ["short_conns"])
    assert lines[0] == ("| measurement | direct | HAProxy | labelproxy | labelproxy-routes | "
                        "labelproxy-checked | vs HAProxy | vs best peer | "
                        "with 1,000 unchecked routes vs without | "
                        "with 1,000 checked routes vs without |")
    assert lines[2].endswith(
        "| 300 | 100 | **80.0** | **84.0** | **76.0** | 0.80x | 0.80x | 1.05x | 0.95x |")


def test_the_kernel_target_runs_beside_the_relay_in_a_namespace_of_the_benchs_own(
    tmp_path: Path,
) -> None:
    """`--netns` re-runs the bench under `unshare --net`; labelproxy-kernel forwards every
    route with nftables there (the host's own ruleset is left alone: tests/run's host guard),
    and the summary gives both labelproxy paths' ratios to direct."""
    _require_peers()
    out = _quick(tmp_path, "--netns", "--targets", "direct,labelproxy,labelproxy-kernel",
                 "--only", "short_conns,udp")
    assert "  - labelproxy-kernel: the same, with LABELPROXY_FORWARDING=kernel" in out
    assert "| relay vs direct | kernel vs direct |" in out
    for title, table in _tables(out).items():
        row = re.search(r"^\| labelproxy-kernel \| (-?[\d,.]+) \|", table, re.MULTILINE)
        assert row is not None, (title, table)


def test_the_kernel_target_is_refused_without_netns() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--targets", "labelproxy-kernel", "--no-install"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "labelproxy-kernel programs nftables, never in the host's network namespace" \
        in done.stderr  # fmt: skip
