"""The targets the same load runs through: direct, HAProxy, nginx stream, socat, labelproxy,
and on request the reference floor `pyfloor` (a bare CPython relay, `bench/tools/pyfloor.py`)
and `labelproxy-kernel` (labelproxy with `LABELPROXY_FORWARDING=kernel`: nftables forwards
its routes; only in a bench started with `--netns`, see `bench/netns.py`).

Each `start_*` writes the target's configuration into the work directory, starts it as a child
of the bench, listening on 127.0.0.1 only, with one listen port per route, and returns a
`Target` once every listener is up. Thread/worker counts are fixed here and named in `note`, so
the report says honestly what each peer was given.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import checked, netns
from bench.procs import (
    BenchError,
    Children,
    free_port,
    wait_until_listening,
    wait_until_udp_bound,
)
from bench.sniconf import ROUTE as SNI_ROUTE
from bench.sniconf import haproxy_frontend, labelproxy_routes
from bench.toolchain import NGINX_STREAM_MODULE
from bench.upstreams import TCP_ROUTES, UDP_ROUTES

logger = logging.getLogger(__name__)

PEERS = ("haproxy", "nginx", "socat")
DEFAULT_TARGETS = ("direct", "haproxy", "nginx", "socat", "labelproxy")
KERNEL_TARGET = "labelproxy-kernel"
CHECKED_TARGET = checked.CHECKED_TARGET  # the relay with 1,000 checked idle routes beside
ROUTES_TARGET = checked.ROUTES_TARGET  # the relay with 1,000 unchecked idle routes beside
# run only when named in --targets; never a peer ("vs best peer" compares with PEERS only)
REFERENCE_TARGETS = ("pyfloor", KERNEL_TARGET, ROUTES_TARGET, CHECKED_TARGET)
ALL_TARGETS = DEFAULT_TARGETS + REFERENCE_TARGETS
PYFLOOR = Path(__file__).resolve().parent / "tools" / "pyfloor.py"
START_TIMEOUT = 30.0


@dataclass(slots=True)
class Target:
    """A running target: its listen port per route and the PIDs whose CPU/memory count."""

    name: str
    ports: dict[str, int]
    roots: list[int] = field(default_factory=list)
    udp: bool = True
    note: str = ""


@dataclass(frozen=True, slots=True)
class StartContext:
    """What every `start_*` needs."""

    children: Children
    workdir: Path
    upstream: dict[str, int]
    repo: Path
    labelproxy_cmd: list[str]
    server: Path | None = None  # the C server (`bench/tools/lpserver.c`), for extra sinks


def _listen_ports(*, udp: bool = True) -> dict[str, int]:
    routes = TCP_ROUTES + (UDP_ROUTES if udp else ())
    return {route: free_port() for route in routes}


def _wait_ready(ctx: StartContext, target: Target, name: str) -> Target:
    deadline = time.monotonic() + START_TIMEOUT
    proc = next(p for p in ctx.children.procs if p.pid == target.roots[0])
    try:
        wait_until_listening([target.ports[r] for r in TCP_ROUTES], deadline=deadline, alive=proc)
        if target.udp:
            wait_until_udp_bound([target.ports[r] for r in UDP_ROUTES], deadline=deadline)
    except BenchError as exc:
        tail = ctx.children.log_tail(name)
        raise BenchError(f"{name} did not start: {exc}; log: {tail}") from None
    return target


def start_direct(ctx: StartContext) -> Target:
    ports = {**ctx.upstream, SNI_ROUTE: ctx.upstream["echo"]}  # the floor of the sni rows
    return Target(name="direct", ports=ports, note="no proxy: the physical limit")


def start_haproxy(ctx: StartContext) -> Target:
    ports = _listen_ports(udp=False)
    sections = []
    for route in TCP_ROUTES:
        sections.append(
            f"frontend f_{route}\n    bind 127.0.0.1:{ports[route]}\n"
            f"    default_backend b_{route}\n"
            f"backend b_{route}\n    server s1 127.0.0.1:{ctx.upstream[route]}\n"
        )
    ports[SNI_ROUTE] = free_port()
    sections.append(haproxy_frontend(ports[SNI_ROUTE], ctx.upstream["echo"]))
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    maxconn = min(20_000, int((soft - 100) / 2.6))  # haproxy wants about 2.5 fds per maxconn
    conf = ctx.workdir / "haproxy.cfg"
    conf.write_text(
        f"global\n    nbthread 1\n    maxconn {maxconn}\n\n"
        f"defaults\n    mode tcp\n    option splice-auto\n    maxconn {maxconn}\n"
        "    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\n"
        + "\n".join(sections)
    )
    proc = ctx.children.start(["haproxy", "-db", "-f", str(conf)], name="haproxy")
    target = Target(
        name="haproxy",
        ports=ports,
        roots=[proc.pid],
        udp=False,
        note="nbthread 1, mode tcp, option splice-auto; no UDP",
    )
    return _wait_ready(ctx, target, "haproxy")


def start_nginx(ctx: StartContext) -> Target:
    ports = _listen_ports()
    prefix = ctx.workdir / "nginx-stream"
    prefix.mkdir(parents=True, exist_ok=True)
    servers = [
        f"    server {{ listen 127.0.0.1:{ports[r]}; proxy_pass 127.0.0.1:{ctx.upstream[r]}; "
        "proxy_timeout 1h; }"
        for r in TCP_ROUTES
    ] + [
        f"    server {{ listen 127.0.0.1:{ports[r]} udp; proxy_pass 127.0.0.1:{ctx.upstream[r]}; "
        "proxy_timeout 30s; }"
        for r in UDP_ROUTES
    ]
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"load_module {NGINX_STREAM_MODULE};\n"
        f"daemon off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\n"
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "events { worker_connections 12000; }\n"
        "stream {\n" + "\n".join(servers) + "\n}\n"
    )
    proc = ctx.children.start(
        ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        name="nginx",
    )
    target = Target(
        name="nginx",
        ports=ports,
        roots=[proc.pid],
        note="stream module, worker_processes 1 (+ its master)",
    )
    return _wait_ready(ctx, target, "nginx")


def start_socat(ctx: StartContext) -> Target:
    ports = _listen_ports()
    roots = []
    for route in TCP_ROUTES:
        argv = [
            "socat",
            f"TCP4-LISTEN:{ports[route]},fork,reuseaddr,bind=127.0.0.1,backlog=4096",
            f"TCP4:127.0.0.1:{ctx.upstream[route]},nodelay",
        ]
        roots.append(ctx.children.start(argv, name="socat").pid)
    for route in UDP_ROUTES:
        argv = [
            "socat",
            "-T",
            "30",
            f"UDP4-LISTEN:{ports[route]},fork,reuseaddr,bind=127.0.0.1",
            f"UDP4:127.0.0.1:{ctx.upstream[route]}",
        ]
        roots.append(ctx.children.start(argv, name="socat").pid)
    target = Target(
        name="socat",
        ports=ports,
        roots=roots,
        note="one process per route, forks one per connection; UDP4-LISTEN,fork (one child "
        "per client: UDP4-RECVFROM,fork would fork per datagram)",
    )
    return _wait_ready(ctx, target, "socat")


def labelproxy_routes_yaml(*, ports: dict[str, int], upstream: dict[str, int]) -> str:
    lines = ["routes:"]
    if SNI_ROUTE in ports:  # two routes chosen by name on one port (the sni section)
        lines += labelproxy_routes(ports[SNI_ROUTE], upstream["echo"])
    for route in TCP_ROUTES + UDP_ROUTES:
        scheme = "udp4" if route in UDP_ROUTES else "tcp4"
        lines.append(
            f"  bench-{route}: {{scheme: {scheme}, bind: 127.0.0.1, "
            f'port: "{ports[route]}:{upstream[route]}", host: 127.0.0.1, healthcheck: none}}'
        )  # no active check: the rows measure the relay, and a check would be one more client
    return "\n".join(lines) + "\n"


def labelproxy_env(*, routes_file: Path | None, http_port: int, docker_host: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELPROXY_")}
    env.update(
        LABELPROXY_DOCKER_HOST=docker_host,
        LABELPROXY_HTTP_ADDR=f"127.0.0.1:{http_port}",
        LABELPROXY_ALLOW="0.0.0.0/0,::/0",
        LABELPROXY_LOG_LEVEL="warning",
        # the relay target relays; the kernel target (own namespace only) says so itself
        LABELPROXY_FORWARDING="relay",
    )
    if routes_file is not None:
        env["LABELPROXY_ROUTES_FILE"] = str(routes_file)
    return env


def http_get(port: int, path: str, *, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path -> (status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (OSError, ValueError):
        return 0, b""


def wait_ready_endpoint(http_port: int, *, deadline: float, alive: Callable[[], bool]) -> None:
    """Return once labelproxy's /readyz answers 200; raise `BenchError` otherwise."""
    while http_get(http_port, "/readyz", timeout=1.0)[0] != 200:
        if not alive():
            raise BenchError("labelproxy exited before it was ready")
        if time.monotonic() > deadline:
            raise BenchError("labelproxy /readyz did not answer 200 before the deadline")
        time.sleep(0.02)


def relay_connection_cap() -> int:
    """The global connection cap the bench gives labelproxy: two descriptors a connection
    under the open-files limit its children inherit, less 1,024 for the control plane.
    The automatic cap keeps more in reserve (a quarter of seven eighths: 4,375 under a
    20,000 limit), below the 5,000 connections the memory section holds."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, (soft - 1024) // 2)


def start_labelproxy(ctx: StartContext, *, kernel: bool = False, idle_routes: bool = False,
                     with_checks: bool = False) -> Target:
    """The relay (or with `kernel` the kernel path); with `idle_routes` 1,000 idle routes
    beside, with the default check when `with_checks`."""
    name = (KERNEL_TARGET if kernel else
            (CHECKED_TARGET if with_checks else ROUTES_TARGET) if idle_routes else "labelproxy")
    if kernel and not netns.inside():
        raise BenchError(f"{name} programs nftables: run the bench with --netns")
    ports = _listen_ports()
    if not kernel:
        ports[SNI_ROUTE] = free_port()
    routes_file = ctx.workdir / f"{name}-routes.yaml"
    routes = labelproxy_routes_yaml(ports=ports, upstream=ctx.upstream)
    if idle_routes:
        if ctx.server is None:
            raise BenchError(f"{name} needs the bench's C server for its idle routes' sink")
        routes += checked.routes_yaml(sink_port=checked.start_sink(ctx.children, ctx.server),
                                      checks=with_checks)
    routes_file.write_text(routes)
    http_port = free_port()
    env = labelproxy_env(routes_file=routes_file, http_port=http_port, docker_host="none")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ctx.repo), env.get("PYTHONPATH")]))
    cap = relay_connection_cap()
    env["LABELPROXY_MAX_CONNECTIONS"] = str(cap)
    if kernel:
        env["LABELPROXY_FORWARDING"] = "kernel"
    proc = ctx.children.start(ctx.labelproxy_cmd, name=name, env=env, cwd=ctx.repo)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        wait_ready_endpoint(http_port, deadline=deadline, alive=lambda: proc.poll() is None)
    except BenchError as exc:
        raise BenchError(f"{exc}; log: {ctx.children.log_tail(name)}") from None
    status, body = http_get(http_port, "/routes")
    logger.debug("%s /routes %s: %s", name, status, body[:500])
    note = ("run as a user runs it (python -m labelproxy, a routes file); metrics and an "
            f"allow-all ACL on; LABELPROXY_MAX_CONNECTIONS={cap} (two descriptors a "
            "connection under the bench's open-files limit)")
    if idle_routes:
        checked.wait_checked(lambda: http_get(http_port, "/routes", timeout=5.0),
                             deadline=time.monotonic() + START_TIMEOUT)
        note += "; " + (checked.NOTE if with_checks else checked.ROUTES_NOTE)
    if kernel:
        paths = {r.get("forwarding") for r in json.loads(body or b"{}").get("routes", [])}
        if paths != {"kernel"}:
            raise BenchError(f"{name}: routes not all forwarded by the kernel ({body[:300]!r})")
        note = ("the same, with LABELPROXY_FORWARDING=kernel: nftables forwards every route "
                "(NAT and conntrack in the kernel, counted in no process: its CPU figures are "
                "labelproxy's own, about nothing)")
    target = Target(name=name, ports=ports, roots=[proc.pid], note=note)
    return _wait_ready(ctx, target, name)


def start_labelproxy_kernel(ctx: StartContext) -> Target:
    return start_labelproxy(ctx, kernel=True)


def start_labelproxy_checked(ctx: StartContext) -> Target:
    return start_labelproxy(ctx, idle_routes=True, with_checks=True)


def start_labelproxy_routes(ctx: StartContext) -> Target:
    return start_labelproxy(ctx, idle_routes=True)


def start_pyfloor(ctx: StartContext) -> Target:
    ports = _listen_ports(udp=False)
    pairs = [f"{ports[route]}:{ctx.upstream[route]}" for route in TCP_ROUTES]
    proc = ctx.children.start([sys.executable, str(PYFLOOR), *pairs], name="pyfloor")
    target = Target(
        name="pyfloor",
        ports=ports,
        roots=[proc.pid],
        udp=False,
        note="reference floor, not a peer: bench/tools/pyfloor.py, a bare single-threaded "
        "CPython epoll relay (no metrics, ACL, splice or timeouts); no UDP",
    )
    return _wait_ready(ctx, target, "pyfloor")


STARTERS: dict[str, Callable[[StartContext], Target]] = {
    "direct": start_direct,
    "haproxy": start_haproxy,
    "nginx": start_nginx,
    "socat": start_socat,
    "labelproxy": start_labelproxy,
    "pyfloor": start_pyfloor,
    KERNEL_TARGET: start_labelproxy_kernel,
    CHECKED_TARGET: start_labelproxy_checked,
    ROUTES_TARGET: start_labelproxy_routes,
}


def default_labelproxy_cmd() -> list[str]:
    return [sys.executable, "-m", "labelproxy"]


def describe_routes(target: Target) -> str:
    return json.dumps(target.ports, sort_keys=True)
