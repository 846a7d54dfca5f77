"""The programs the benchmark runs: Debian's peers, the C load generators, and the machine.

`find_missing` / `install_peers` make sure haproxy, nginx (+ stream module), socat, iperf3 and
wrk are present (installing them with apt-get when allowed); `build_tools` compiles
`bench/tools/*.c` with gcc into a cache directory keyed by the sources' hash (no binaries are
committed); `machine_header` describes the machine and the versions for the report.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError

logger = logging.getLogger(__name__)

TOOLS_DIR = Path(__file__).resolve().parent / "tools"
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
PEER_PACKAGES = ("haproxy", "nginx", "libnginx-mod-stream", "socat", "iperf3", "wrk")
# program -> the Debian package that ships it
PROGRAMS = {
    "haproxy": "haproxy",
    "nginx": "nginx",
    "socat": "socat",
    "iperf3": "iperf3",
    "wrk": "wrk",
    "gcc": "gcc",
}


@dataclass(frozen=True, slots=True)
class Tools:
    """Paths of the compiled C helpers."""

    server: Path
    client: Path


def find_missing() -> list[str]:
    """Debian packages whose program (or nginx stream module) is not installed."""
    missing = [pkg for prog, pkg in PROGRAMS.items() if shutil.which(prog) is None]
    if not NGINX_STREAM_MODULE.exists():
        missing.append("libnginx-mod-stream")
    return missing


def install_peers(packages: list[str]) -> None:
    """`apt-get install` the packages (root only); raises `BenchError` when that fails."""
    if not packages:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(f"missing {', '.join(packages)} and cannot apt-get install them here")
    logger.warning("installing %s with apt-get", " ".join(packages))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=False)
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            raise BenchError(f"apt-get install {' '.join(packages)} failed")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "labelproxy-bench"


def build_tools(*, cache_dir: Path) -> Tools:
    """Compile lpserver/lpclient unless binaries of the same sources are cached."""
    paths: dict[str, Path] = {}
    for name in ("lpserver", "lpclient"):
        source = TOOLS_DIR / f"{name}.c"
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        binary = cache_dir / f"{name}-{digest}"
        if not binary.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_suffix(f".tmp{os.getpid()}")
            cmd = ["gcc", "-O2", "-Wall", "-o", str(tmp), str(source)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise BenchError(f"gcc failed on {source.name}: {result.stderr.strip()}")
            tmp.replace(binary)
        paths[name] = binary
    return Tools(server=paths["lpserver"], client=paths["lpclient"])


def _version(argv: list[str], pattern: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    match = re.search(pattern, result.stdout + result.stderr)
    return match.group(1) if match else "unknown"


def peer_versions() -> dict[str, str]:
    return {
        "haproxy": _version(["haproxy", "-v"], r"version (\S+)"),
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "socat": _version(["socat", "-V"], r"socat version (\S+)"),
        "iperf3": _version(["iperf3", "-v"], r"iperf (\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def labelproxy_revision(repo: Path) -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return result.stdout.strip() or "unknown"


def machine_header(*, repo: Path, command: list[str]) -> dict[str, str]:
    """What the report's header says about where and how it ran."""
    versions = peer_versions()
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count() or 0),
        "kernel": platform.release(),
        "versions": ", ".join(f"{name} {ver}" for name, ver in versions.items()),
        "labelproxy": labelproxy_revision(repo),
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *command]),
    }
