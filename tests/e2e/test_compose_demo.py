"""`docker compose up -d` with compose.yaml never tries to pull `labelproxy:local`.

The image is built by the `labelproxy` service; the demo services run the same image. Asked to
pull it, compose contacts a registry for a repository that does not exist and the demo fails
(or warns) on a machine that has no such image yet. Compose's dry run against the suite's
private engine (which has no images) shows what `up -d` would do, pulls included.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.dockerd import PrivateDockerd

ROOT = Path(__file__).resolve().parents[2]


def _compose_v2(dockerd: PrivateDockerd) -> None:
    version = subprocess.run(
        ["docker", "compose", "version"], env=dockerd.env, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    if version.returncode != 0 or not re.search(r"v2\.(\d+)", version.stdout):
        message = "docker compose v2 is missing (bash tests/support/install_compose.sh)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def test_compose_up_builds_the_local_image_and_pulls_nothing(dockerd: PrivateDockerd) -> None:
    dockerd.ensure_running()
    _compose_v2(dockerd)
    done = subprocess.run(
        ["docker", "compose", "--dry-run", "-f", "compose.yaml", "up", "-d"],
        cwd=ROOT, env={**dockerd.env, "COMPOSE_BAKE": "false"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Pulling" not in output and "registry" not in output, output
    assert re.search(r"Service labelproxy\s+Built", output), output
    for service in ("labelproxy", "echo", "udp-echo"):
        assert re.search(rf"Container labelproxy-demo-{service}-1\s+Started", output), output
