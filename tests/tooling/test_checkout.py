"""The README's two commands and the checkout around them.

The README's first lines name a run command and a test command; CI (`.ci/run`) must run that very
test command, the run command's script must exist and be valid bash, and on a checkout that
`tests/run` provisioned, the run command starts labelproxy at once (no install step). Build
leftovers (`wheels/`, `.venv/`) are ignored by git.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import labelproxy

ROOT = Path(__file__).resolve().parents[2]


def _readme_command(label: str) -> str:
    head = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    found = re.search(rf"^- \*\*{label}\*\*[^`]*`([^`]+)`", head, re.MULTILINE)
    assert found, f"README's first lines have no **{label}** command"
    return found.group(1)


def test_ci_runs_the_readme_test_command() -> None:
    command = _readme_command("Test")
    assert command == "bash tests/run"
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert command in ci


def test_the_readme_run_command_is_a_valid_script() -> None:
    command = _readme_command("Run")
    assert command == "bash deploy/run"
    checked = subprocess.run(["bash", "-n", str(ROOT / "deploy/run")], capture_output=True,
                             text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_run_command_on_a_provisioned_checkout_starts_without_installing() -> None:
    venv = ROOT / ".venv"
    if not (venv / ".provisioned-run").is_file() or not (venv / "bin/labelproxy").exists():
        pytest.skip("this checkout's .venv is not provisioned (tests/run does that)")
    started = time.monotonic()
    done = subprocess.run(["bash", "deploy/run", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert labelproxy.__version__ in done.stdout
    assert "pip install" not in done.stderr and "venv" not in done.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s"


@pytest.mark.parametrize("path", ["wheels/labelproxy-0.1.0-py3-none-any.whl", ".venv/bin/python"])
def test_build_leftovers_are_ignored_by_git(path: str) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    checked = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
    assert checked.returncode == 0, f"git does not ignore {path}"
