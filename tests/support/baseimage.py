"""Make a local Python base image without a registry: debootstrap + `docker import`.

`ensure_base_tarball` runs `debootstrap --variant=minbase --include=python3-venv,nftables
bookworm` once and caches the root filesystem as a tarball under a persistent cache dir (default
`/var/cache/labelproxy-test`, or `LABELPROXY_TEST_CACHE`), so later runs take seconds.
`ensure_base_image` imports that tarball into a Docker engine as an image (default tag
`labelproxy-test/python-base:bookworm-nft`) unless the engine already has it. The image has Python
at `/usr/bin/python3` with the `venv` module and no pip in the system, which the Dockerfile
handles, and the `nft` program the Dockerfile would otherwise install with apt (offline here).

Command line (warms the cache ahead of a test run):
    python tests/support/baseimage.py [--docker-host unix:///path] [--tag NAME]
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path("/var/cache/labelproxy-test")
DEFAULT_TAG = "labelproxy-test/python-base:bookworm-nft"
TARBALL_NAME = "bookworm-minbase-python3-nftables.tar"
SUITE = "bookworm"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
DEBOOTSTRAP_TIMEOUT = 900.0


class BaseImageError(Exception):
    """The base image could not be made; the message says why."""


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses (or `LABELPROXY_DEBIAN_MIRROR`)."""
    override = os.environ.get("LABELPROXY_DEBIAN_MIRROR")
    if override:
        return override
    files: list[Path] = []
    for source in APT_SOURCES:
        if source.is_dir():
            files.extend(sorted(p for p in source.iterdir() if p.suffix in (".list", ".sources")))
        elif source.is_file():
            files.append(source)
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            words = line.split("#", 1)[0].split()
            urls = [w for w in words if w.startswith(("http://", "https://"))]
            if urls and (words[0] in ("deb", "URIs:")) and urls[0].rstrip("/").endswith("/debian"):
                return urls[0]
    raise BaseImageError(
        "no Debian archive found in the apt sources; set LABELPROXY_DEBIAN_MIRROR"
    )


def cache_dir() -> Path:
    """The persistent cache directory (created on demand)."""
    path = Path(os.environ.get("LABELPROXY_TEST_CACHE", str(DEFAULT_CACHE)))
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_base_tarball(*, cache: Path | None = None) -> Path:
    """The cached rootfs tarball, made with debootstrap on first use (serialised by a lock)."""
    cache = cache or cache_dir()
    tarball = cache / TARBALL_NAME
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        raise BaseImageError("debootstrap is not installed (apt-get install debootstrap)")
    with (cache / (TARBALL_NAME + ".lock")).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():  # made by another process while we waited
            return tarball
        with tempfile.TemporaryDirectory(dir=cache, prefix="rootfs-") as tmp:
            root = Path(tmp) / "root"
            cmd = [
                "debootstrap",
                "--variant=minbase",
                "--include=python3-venv,nftables",
                SUITE,
                str(root),
                debian_mirror(),
            ]
            logger.info("making the base rootfs: %s", " ".join(cmd))
            try:
                done = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise BaseImageError(f"debootstrap timed out after {exc.timeout:.0f}s") from None
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                raise BaseImageError(
                    f"debootstrap failed (exit {done.returncode}): " + " | ".join(tail)
                )
            _slim(root)
            partial = cache / (TARBALL_NAME + ".part")
            subprocess.run(
                ["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], check=True
            )
            partial.rename(tarball)
    return tarball


def _slim(root: Path) -> None:
    """Drop what a runtime image never needs (apt lists and caches, docs, man pages)."""
    for rel in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
        target = root / rel
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def _docker(docker_host: str, *args: str) -> list[str]:
    return ["docker", "-H", docker_host, *args]


def ensure_base_image(*, docker_host: str, tag: str = DEFAULT_TAG) -> str:
    """Import the base rootfs into the engine at `docker_host` as `tag` (if missing)."""
    present = subprocess.run(
        _docker(docker_host, "image", "inspect", tag), capture_output=True, check=False
    )
    if present.returncode == 0:
        return tag
    tarball = ensure_base_tarball()
    with tarball.open("rb") as data:
        done = subprocess.run(
            _docker(docker_host, "import", "--change", 'CMD ["/usr/bin/python3"]', "-", tag),
            stdin=data,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    if done.returncode != 0:
        raise BaseImageError(f"docker import failed: {done.stderr.strip()}")
    return tag


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--docker-host", default=None, help="import into this engine as well")
    parser.add_argument("--tag", default=DEFAULT_TAG)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(ensure_base_tarball())
        if args.docker_host:
            print(ensure_base_image(docker_host=args.docker_host, tag=args.tag))
    except BaseImageError as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
