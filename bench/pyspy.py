"""`--profile`: record labelproxy with py-spy while each data-plane measurement runs.

`Recorder.record(section, target)` wraps one measurement: for the labelproxy target it starts
`py-spy record --pid PID --rate 1000 --format raw` (plus `--threads` for thread names and
`--full-filenames` so source lines can be read back), waits until py-spy has attached, lets
the load run, then stops py-spy by PID (SIGINT: py-spy writes its file and exits) and waits
for it with a deadline. Other targets run unrecorded. `write_summaries` then writes, per
section, the concatenated raw samples and their summary (`bench.profile`) to the results
directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import profile
from bench.procs import BenchError, Children, read_line
from bench.targets import Target

logger = logging.getLogger(__name__)

PROFILED_TARGET = "labelproxy"
RATE = 1000
MAX_SECONDS = 300  # py-spy's own limit; recording normally stops when the measurement ends
ATTACH_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
INSTALL_HINT = "pip install py-spy (or pip install -e '.[bench]')"


def find_py_spy() -> Path | None:
    """py-spy next to the bench's Python (its venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("py-spy")
    return Path(found) if found else None


@dataclass
class Recorder:
    """Records the profiled target; `raw` lists each section's raw files in order."""

    py_spy: Path
    children: Children
    workdir: Path
    raw: dict[str, list[Path]] = field(default_factory=dict)

    @contextlib.contextmanager
    def record(self, section: str, target: Target) -> Iterator[None]:
        """Profile `target` while the body runs (a no-op for every other target)."""
        if target.name != PROFILED_TARGET or not target.roots:
            yield
            return
        files = self.raw.setdefault(section, [])
        output = self.workdir / f"profile-{section}-{len(files)}.raw"
        argv = [str(self.py_spy), "record", "--pid", str(target.roots[0]), "--rate", str(RATE)]
        argv += ["--format", "raw", "--output", str(output), "--duration", str(MAX_SECONDS)]
        argv += ["--threads", "--full-filenames"]
        proc = self.children.start(argv, name="py-spy", stdout_pipe=True)
        try:
            self._wait_attached(proc)
            yield
        finally:
            self._stop(proc)
        if output.is_file():
            files.append(output)
        else:
            logger.warning(
                "py-spy wrote no profile for %s: %s", section, self.children.log_tail("py-spy")
            )

    def _wait_attached(self, proc: subprocess.Popen[bytes]) -> None:
        """Return once py-spy says it is sampling (it prints that after attaching)."""
        assert proc.stdout is not None
        try:
            while "Sampling process" not in read_line(proc.stdout, timeout=ATTACH_TIMEOUT):
                pass
        except BenchError as exc:
            raise BenchError(
                f"py-spy did not attach: {exc}; log: {self.children.log_tail('py-spy')}"
            ) from None

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGINT by PID (py-spy then writes its output), SIGKILL after the deadline."""
        self.children.stop(proc, timeout=STOP_TIMEOUT, first=signal.SIGINT)


def source_roots(repo: Path) -> list[Path]:
    """Where py-spy's file names may be relative to: the repository and site-packages."""
    roots = [repo]
    for key in ("purelib", "platlib", "stdlib"):
        path = Path(sysconfig.get_paths()[key])
        if path not in roots:
            roots.append(path)
    return roots


def write_summaries(out: Path, raw: dict[str, list[Path]], *, repo: Path) -> list[Path]:
    """Write `profile-<section>.raw` (every sample) and `profile-<section>.md` to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    roots = source_roots(repo)
    lookup = profile.file_lines(roots)
    written = []
    for section, files in raw.items():
        if not files:
            continue
        text = "".join(path.read_text() for path in files)
        (out / f"profile-{section}.raw").write_text(text)
        summary = out / f"profile-{section}.md"
        summary.write_text(profile.summarise(section, text, lookup, roots=roots) + "\n")
        written.append(summary)
    return written
