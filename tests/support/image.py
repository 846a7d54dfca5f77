"""Build labelproxy's container image on a private engine, offline: the Dockerfile on the local
Python base (tests/support/baseimage.py), with wheels built on the host in the build context.

`build_image(engine, tag=..., workdir=...)` returns the tag; it raises `BaseImageError` when
the base cannot be made here (callers skip, or fail under CI) and `AssertionError` with the
tool's output when pip or docker fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.baseimage import ensure_base_image
from tests.support.dockerd import PrivateDockerd

ROOT = Path(__file__).resolve().parents[2]
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "LICENSE")


def build_image(engine: PrivateDockerd, *, tag: str, workdir: Path) -> str:
    """The image built from this checkout on `engine` as `tag` (see the module docstring)."""
    base = ensure_base_image(docker_host=engine.host)
    ctx = workdir / "image-ctx"
    ctx.mkdir(parents=True, exist_ok=True)
    for name in CONTEXT_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, ctx / name)
    shutil.copytree(
        ROOT / "labelproxy", ctx / "labelproxy",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True,
    )  # fmt: skip
    wheels = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(ctx / "wheels"),
         str(ctx)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert wheels.returncode == 0, wheels.stderr
    build = subprocess.run(
        ["docker", "build", "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "VERSION=test",
         "-t", tag, str(ctx)],
        env={**engine.env, "DOCKER_BUILDKIT": "0"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return tag
