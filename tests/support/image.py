"""Build labelproxy's container image on a private engine, offline: the Dockerfile on the local
Python base (tests/support/baseimage.py), with wheels built on the host in the build context.

`build_image(engine, tag=..., workdir=...)` returns the tag; it raises `BaseImageError` when
the base cannot be made here (callers skip, or fail under CI) and `AssertionError` with the
tool's output when pip or docker fails.

A built image is kept (`docker save`) in the persistent cache dir of baseimage.py, under
`images/`, named by a hash of everything the build reads: the context files of this checkout
(Dockerfile, .dockerignore, pyproject.toml, README.md, LICENSE, labelproxy/), the base tarball,
the build arguments and the host's Python (which builds the wheels). Another engine of the same
run, or a later run of the same sources, loads it (`docker load`, seconds) instead of building
(a minute), like docker's own layer cache would on one engine; any change to those inputs is a
miss and builds anew. Only the newest `KEEP_IMAGES` files are kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.baseimage import TARBALL_NAME, cache_dir, ensure_base_image
from tests.support.dockerd import PrivateDockerd

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "LICENSE")
BUILD_ARGS = ("VERSION=test",)
RECIPE = "labelproxy-image-v1"  # bump when the build steps below change
KEEP_IMAGES = 3


def build_image(engine: PrivateDockerd, *, tag: str, workdir: Path) -> str:
    """The image built from this checkout on `engine` as `tag` (see the module docstring)."""
    cache = cache_dir() / "images"
    cache.mkdir(parents=True, exist_ok=True)
    key = _inputs_hash()
    saved = cache / f"labelproxy-{key}.tar"
    with (cache / f"labelproxy-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker building the same: wait for it
        if saved.exists() and _load(engine, saved, tag):
            logger.info("image %s loaded from %s", tag, saved)
            saved.touch()
            return tag
        _build(engine, tag=tag, workdir=workdir)
        partial = saved.with_suffix(".part")
        done = engine.cli("save", "-o", str(partial), tag, check=False, timeout=300)
        if done.returncode == 0:
            partial.rename(saved)
            _prune(cache)
        else:
            partial.unlink(missing_ok=True)
            logger.warning("could not keep the image in %s: %s", cache, done.stderr.strip())
    return tag


def _context_paths() -> list[Path]:
    paths = [ROOT / name for name in CONTEXT_FILES if (ROOT / name).exists()]
    paths += sorted(
        p for p in (ROOT / "labelproxy").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )  # fmt: skip
    return paths


def _inputs_hash() -> str:
    """A hash of every input of the build (see the module docstring)."""
    digest = hashlib.sha256()
    base = cache_dir() / TARBALL_NAME
    stat = base.stat() if base.exists() else None
    head = [RECIPE, sys.version, *BUILD_ARGS, f"{TARBALL_NAME} {stat and stat.st_size}"
            f" {stat and stat.st_mtime_ns}"]  # fmt: skip
    digest.update("\n".join(head).encode())
    for path in _context_paths():
        digest.update(b"\0" + str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _load(engine: PrivateDockerd, saved: Path, tag: str) -> bool:
    """Load a kept image into `engine` as `tag`; False (and the file removed) when unusable."""
    loaded = engine.cli("load", "-q", "-i", str(saved), check=False, timeout=300)
    image = loaded.stdout.strip().rpartition(" ")[2]  # "Loaded image: NAME:TAG"
    if loaded.returncode == 0 and image:
        tagged = engine.cli("tag", image, tag, check=False)
        if tagged.returncode == 0:
            return True
    logger.warning("discarding unusable kept image %s: %s", saved, loaded.stderr.strip())
    saved.unlink(missing_ok=True)
    return False


def _prune(cache: Path) -> None:
    kept = sorted(cache.glob("labelproxy-*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[KEEP_IMAGES:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".lock").unlink(missing_ok=True)


def _build(engine: PrivateDockerd, *, tag: str, workdir: Path) -> None:
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
    build_args = [arg for value in (f"BASE_IMAGE={base}", *BUILD_ARGS)
                  for arg in ("--build-arg", value)]  # fmt: skip
    build = subprocess.run(
        ["docker", "build", *build_args, "-t", tag, str(ctx)],
        env={**engine.env, "DOCKER_BUILDKIT": "0"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
