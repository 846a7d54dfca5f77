"""`--netns`: the whole benchmark inside a network namespace of its own.

The `labelproxy-kernel` target programs nftables, which must never happen in the host's own
network namespace. With `--netns` the bench re-executes itself (after installing peers and
building its tools, which need the host's network) as
`unshare --net -- sh -c 'ip link set lo up && exec python -m bench ...'`: every target, the
upstreams and the load generators then run in a fresh namespace that has only a loopback
interface, so all targets are still measured side by side in one run. The namespace has no
name and no bind mount: it disappears, with any nftables table, conntrack entry and sysctl set
inside it, when the bench exits. Its network sysctls are the kernel's defaults for a new
namespace, not the host's tuning (the same for every target).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.procs import BenchError

logger = logging.getLogger(__name__)

MARKER = "LABELPROXY_BENCH_NETNS"  # set in the re-executed bench: it runs in its own namespace
LO_UP = 'ip link set lo up && exec "$@"'


def inside() -> bool:
    """True in the bench that `reexec` started (its own network namespace)."""
    return os.environ.get(MARKER) == "1"


def reexec(argv: list[str], *, repo: Path) -> int:
    """Run `python -m bench ARGV --no-install` in a fresh network namespace; its exit status."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            raise BenchError(f"--netns needs {tool} (util-linux, iproute2)")
    if os.geteuid() != 0:
        raise BenchError("--netns needs root (unshare --net)")
    extra = [] if "--no-install" in argv else ["--no-install"]  # peers were installed here
    cmd = ["unshare", "--net", "--", "sh", "-c", LO_UP, "sh",
           sys.executable, "-m", "bench", *argv, *extra]  # fmt: skip
    logger.info("re-running the bench in a network namespace of its own (unshare --net)")
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, MARKER: "1"})
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait(timeout=60)
        raise
