"""Convergence of labelproxy on a private dockerd: how fast labels become listeners.

- start -> accepting: a labelled busybox container (host network, `sleep`) is started with the
  Engine API; the time until labelproxy's listener for it accepts a TCP connection is measured
  from the start call returning (container running, event emitted) and from the call being
  issued; the container is killed and the listener seen gone before the next start.
- initial sync: N labelled containers are running before labelproxy starts; measured from
  spawning labelproxy to `/readyz` 200 and to every one of the N listeners accepting.
- wake on demand (`wakeup`): a sleeping route's first byte -> its echo, beside the bare
  `docker start` -> listening of the same container.

The routes relay to a port nothing listens on (a probe connection is refused upstream); the
containers only need to run. The private engine comes from `tests/support/dockerd.py`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import wakeup
from bench.measure import Plan
from bench.procs import BenchError, Children, free_port, tcp_accepts
from bench.report import SECTIONS, Results
from bench.targets import http_get, labelproxy_env, wait_ready_endpoint
from tests.support.dockerd import PrivateDockerd, build_busybox_image, missing_requirements

logger = logging.getLogger(__name__)

SECTION = "convergence"
LABEL_PREFIX = "proxy"
WAIT_LIMIT = 10.0
SYNC_LIMIT = 120.0
WORKERS = 8


def _port_block(count: int) -> list[int]:
    """`count` TCP ports on 127.0.0.1, free now, below the ephemeral range and the test
    suite's port pool (tests/support/ports.py: 20,000 up)."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(10_000, 20_000 - count)  # below the test suite's port pool
        ports = list(range(base, base + count))
        if all(_free(port) for port in ports):
            return ports
    raise BenchError(f"no block of {count} free ports found")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _labels(alias: str, port: int, dead_port: int) -> dict[str, str]:
    return {
        f"{LABEL_PREFIX}.aliases": alias,
        f"{LABEL_PREFIX}.{alias}.port": f"{port}:{dead_port}",
        f"{LABEL_PREFIX}.{alias}.scheme": "tcp4",
        f"{LABEL_PREFIX}.{alias}.bind": "127.0.0.1",
    }


def _wait(condition: Any, *, limit: float, what: str) -> float:
    """Poll `condition` (1 ms apart: a listener appearing notifies nobody); monotonic time."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {limit:.0f}s waiting for {what}")
        time.sleep(0.001)
    return time.monotonic()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p * len(ordered) + 0.4999) - 1))]


@contextlib.contextmanager
def _labelproxy(
    children: Children, *, cmd: list[str], repo: Path, engine_host: str, name: str
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    http_port = free_port()
    env = labelproxy_env(routes_file=None, http_port=http_port, docker_host=engine_host)
    env["LABELPROXY_DRAIN_TIMEOUT"] = "1s"
    proc = children.start(cmd, name=name, env=env, cwd=repo)
    try:
        yield proc, http_port
    finally:
        children.stop(proc, timeout=15)


def _start_accept(
    client: Any,
    image: str,
    *,
    children: Children,
    cmd: list[str],
    repo: Path,
    host: str,
    starts: int,
    dead_port: int,
) -> tuple[list[float], list[float]]:
    port = _port_block(1)[0]
    container = client.containers.create(
        image, ["sleep", "86400"], labels=_labels("probe", port, dead_port),
        network_mode="host", init=True, detach=True,
    )  # fmt: skip
    after_call: list[float] = []
    from_call: list[float] = []
    with _labelproxy(children, cmd=cmd, repo=repo, engine_host=host, name="labelproxy-conv") as (
        proc,
        http_port,
    ):
        wait_ready_endpoint(http_port, deadline=time.monotonic() + 30,
                            alive=lambda: proc.poll() is None)  # fmt: skip
        for _ in range(starts):
            issued = time.monotonic()
            container.start()
            returned = time.monotonic()
            accepting = _wait(lambda: tcp_accepts(port, timeout=0.05), limit=WAIT_LIMIT,
                              what="the started container's listener")  # fmt: skip
            after_call.append((accepting - returned) * 1e3)
            from_call.append((accepting - issued) * 1e3)
            container.kill()
            container.wait(timeout=WAIT_LIMIT)
            _wait(lambda: not tcp_accepts(port, timeout=0.05), limit=WAIT_LIMIT,
                  what="the killed container's listener to close")  # fmt: skip
    container.remove(force=True)
    return after_call, from_call


def _create_many(client: Any, image: str, count: int, dead_port: int) -> list[int]:
    ports = _port_block(count)

    def create_and_start(index: int) -> str:
        container = client.containers.create(
            image, ["sleep", "86400"], labels=_labels(f"c{index}", ports[index], dead_port),
            network_mode="host", init=True, detach=True, name=f"lpbench-{index}",
        )  # fmt: skip
        container.start()
        return str(container.id)

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(create_and_start, range(count)))
    logger.info("%d labelled containers running after %.1fs", count, time.monotonic() - began)
    return ports


def _sync(
    *, children: Children, cmd: list[str], repo: Path, host: str, ports: list[int]
) -> tuple[float, float, int]:
    spawned = time.monotonic()
    with _labelproxy(children, cmd=cmd, repo=repo, engine_host=host, name="labelproxy-sync") as (
        proc,
        http_port,
    ):
        wait_ready_endpoint(http_port, deadline=spawned + SYNC_LIMIT,
                            alive=lambda: proc.poll() is None)  # fmt: skip
        ready = time.monotonic()
        pending = list(ports)
        deadline = spawned + SYNC_LIMIT
        while pending:
            pending = [port for port in pending if not tcp_accepts(port, timeout=0.2)]
            if pending and time.monotonic() > deadline:
                raise BenchError(f"{len(pending)} of {len(ports)} listeners never accepted")
        accepting = time.monotonic()
        status, body = http_get(http_port, "/routes", timeout=10)
        logger.debug("/routes answered %d with %d bytes", status, len(body))
    return ready - spawned, accepting - spawned, status


def run(
    *, plan: Plan, workdir: Path, repo: Path, labelproxy_cmd: list[str], results: Results
) -> None:
    """Measure convergence; every failure lands in `results.errors`."""
    section = next(s for s in SECTIONS if s.key == SECTION)
    for target in results.targets:
        if target != "labelproxy":
            results.skip(section=section, target=target, reason="n/a (labelproxy only)")
    if "labelproxy" not in results.targets:
        return
    reason = missing_requirements()
    if reason is not None:
        logger.warning("convergence section skipped: %s", reason)
        results.skip(section=section, target="labelproxy", reason=f"skipped: {reason}")
        return
    children = Children(log_dir=workdir)
    engine = PrivateDockerd(live_restore=False)
    dead_port = free_port()
    try:
        engine.start()
        client = engine.client(timeout=120)
        image = build_busybox_image(client)
        common: dict[str, Any] = {"children": children, "cmd": labelproxy_cmd, "repo": repo,
                                  "host": engine.host}  # fmt: skip
        rep = 0
        try:
            for rep in range(plan.reps):
                logger.info("convergence rep %d/%d: %d starts", rep + 1, plan.reps, plan.starts)
                after, issued = _start_accept(client, image, starts=plan.starts,
                                              dead_port=dead_port, **common)  # fmt: skip
                values = {"start_accept_p50_ms": statistics.median(after),
                          "start_accept_p99_ms": _pct(after, 0.99),
                          "start_call_accept_p99_ms": _pct(issued, 0.99)}  # fmt: skip
                results.add(section=SECTION, target="labelproxy", rep=rep, values=values,
                            raw={"after_call_ms": after, "from_call_ms": issued})  # fmt: skip
                wakes, bare = wakeup.measure(client, image, starts=plan.starts,
                                             ports=_port_block(2), labelproxy=_labelproxy,
                                             **common)  # fmt: skip
                results.add(section=SECTION, target="labelproxy", rep=rep,
                            values={"wake_echo_p50_ms": statistics.median(wakes),
                                    "wake_start_listening_p50_ms": statistics.median(bare)},
                            raw={"wake_ms": wakes, "bare_start_ms": bare})  # fmt: skip
            logger.info("convergence: creating %d labelled containers", plan.containers)
            ports = _create_many(client, image, plan.containers, dead_port)
            for rep in range(plan.reps):
                logger.info("convergence rep %d/%d: initial sync", rep + 1, plan.reps)
                ready, accepting, status = _sync(ports=ports, **common)
                results.add(section=SECTION, target="labelproxy", rep=rep,
                            values={"sync_ready_s": ready, "sync_accepting_s": accepting},
                            raw={"containers": len(ports), "routes_status": status})  # fmt: skip
        except (BenchError, OSError) as exc:
            results.error(section=SECTION, target="labelproxy", rep=rep, message=str(exc))
        finally:
            client.close()
    except Exception as exc:  # the engine itself failed: report, never crash the run
        logger.exception("convergence section failed")
        results.error(section=SECTION, target="labelproxy", rep=0, message=repr(exc))
    finally:
        children.stop_all()
        # without live-restore, stopping the engine stops all its containers in parallel:
        # much faster than removing a thousand one by one
        engine.stop(timeout=120)
        engine.cleanup()
