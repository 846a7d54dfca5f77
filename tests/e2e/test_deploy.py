"""deploy/ and compose files: Prometheus config and alerts (promtool), the Grafana dashboard's
metric names against what labelproxy really exposes, and Compose/Swarm/systemd acceptance."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from labelproxy.metrics import HealthState, Metrics, RouteState, StateSnapshot
from labelproxy.spec import ListenKey
from tests.support.lp import TcpEcho, echo_roundtrip, free_port, labelproxy, wait_for, write_routes

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METRIC_NAME = re.compile(r"\blabelproxy_[a-z0-9_]+\b")


def _require(tool: str, install: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def _run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _compose_cmd() -> list[str]:
    """`docker compose` (v2) when the plugin is there, else Debian's `docker-compose`."""
    if shutil.which("docker") and _run("docker", "compose", "version").returncode == 0:
        return ["docker", "compose"]
    return [_require("docker-compose", "bash tests/support/install_compose.sh")]


def _exposed_names(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _dashboard_exprs() -> list[str]:
    doc = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    exprs.append(value)
                elif key == "query" and isinstance(value, str | dict):
                    walk({"expr": value} if isinstance(value, str) else value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return exprs


def _names_in(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC_NAME.findall(e)}


def _metrics_with_one_route_each() -> set[str]:
    metrics = Metrics()
    metrics.route("web", ListenKey("tcp", "127.0.0.1", 8080))
    metrics.route("dns", ListenKey("udp", "127.0.0.1", 5353))
    metrics.build_info.labels("test").set(1)
    metrics.reconcile_total.labels("ok").inc()
    metrics.docker_events_total.labels("start").inc()
    metrics.reloads_total.labels("ok").inc()
    metrics.reconcile_duration.observe(0.01)
    metrics.wakes_total.labels("web", "tcp://127.0.0.1:8080", "ok").inc()
    metrics.sleeps_total.labels("web", "tcp://127.0.0.1:8080", "stop").inc()
    metrics.held_clients.labels("web", "tcp://127.0.0.1:8080").set(0)
    metrics.route_asleep.labels("web", "tcp://127.0.0.1:8080").set(0)
    metrics.wake_duration.observe(1.0)
    state = StateSnapshot(
        routes=(
            RouteState("web", "tcp", "tcp://127.0.0.1:8080", "127.0.0.1:8081", True, 100),
            RouteState("dns", "udp", "udp://127.0.0.1:5353", "127.0.0.1:53", True, 10_000),
        ),
        errors=(("web", "tcp://127.0.0.1:8080", "conflict"),),
        docker_connected=True,
        health=(
            HealthState(
                "web", "tcp://127.0.0.1:8080", (("127.0.0.1:8081", True),), (("pass", 3),), 0
            ),
        ),
    )
    return _exposed_names(metrics.render(state).decode())


def test_promtool_accepts_alert_rules_and_their_unit_tests() -> None:
    promtool = _require("promtool", "apt-get install prometheus")
    checked = _run(promtool, "check", "rules", str(DEPLOY / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run(promtool, "test", "rules", str(DEPLOY / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_accepts_the_scrape_config() -> None:
    promtool = _require("promtool", "apt-get install prometheus")
    checked = _run(promtool, "check", "config", str(DEPLOY / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alerts_cover_the_promised_conditions_with_existing_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    exprs = {r["alert"]: r["expr"] for r in rules}
    joined = "\n".join(exprs.values())
    for needle in (
        "labelproxy_route_up == 0",
        "rate(labelproxy_upstream_dial_errors_total[5m]) > 0",
        'labelproxy_route_errors{reason="conflict"} > 0',
        "labelproxy_docker_connected == 0",
        "labelproxy_udp_sessions_active",
        "unless on (job, instance, route, listen) (labelproxy_backend_up == 1)",
    ):
        assert needle in joined
    assert _names_in(list(exprs.values())) <= _metrics_with_one_route_each()


def test_dashboard_is_json_and_names_only_metrics_labelproxy_exposes() -> None:
    exprs = _dashboard_exprs()
    used = _names_in(exprs)
    exposed = _metrics_with_one_route_each()
    assert used, "the dashboard has no labelproxy queries"
    assert used <= exposed, f"unknown metrics in the dashboard: {sorted(used - exposed)}"
    # the panels the issue asks for are there
    for needed in (
        "labelproxy_connections_total",
        "labelproxy_connections_active",
        "labelproxy_bytes_total",
        "labelproxy_connections_rejected_total",
        "labelproxy_upstream_dial_errors_total",
        "labelproxy_upstream_dial_duration_seconds_bucket",
        "labelproxy_udp_sessions_active",
        "labelproxy_udp_datagrams_total",
        "labelproxy_route_up",
        "labelproxy_docker_connected",
    ):
        assert needed in used, needed


def test_dashboard_keeps_routes_with_one_alias_apart() -> None:
    """A route is its listen key: every per-route query groups and labels by `route` and
    `listen` (two `ssh` routes on two ports are two lines, not one sum), and a `listen`
    variable filters like the `route` one."""
    doc = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert "listen" in variables["listen"]["definition"]
    targets: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                targets.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc["panels"])
    per_route = [t for t in targets if 'route=~"$route"' in t["expr"]]
    assert len(per_route) >= 15
    for target in per_route:
        expr = target["expr"]
        assert 'listen=~"$listen"' in expr, expr
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            assert {"route", "listen"} <= {g.strip() for g in grouping.split(",")}, expr
        legend = target.get("legendFormat", "")
        assert not legend or "{{listen}}" in legend, legend


def test_dashboard_metrics_are_served_by_a_running_labelproxy(tmp_path: Path) -> None:
    """A real process with one static route, one connection through it: its /metrics has every
    name the dashboard and the alert rules query."""
    backend = TcpEcho()
    try:
        listen = free_port()
        routes = tmp_path / "routes.yml"
        write_routes(
            routes,
            {"web": {"scheme": "tcp4", "bind": "127.0.0.1", "port": f"{listen}:{backend.port}",
                     "host": "127.0.0.1"}},
        )  # fmt: skip
        env = {"LABELPROXY_DOCKER_HOST": "none", "LABELPROXY_ROUTES_FILE": str(routes)}
        with labelproxy(env) as lp:
            assert wait_for(lambda: echo_roundtrip(listen, b"ping") == b"ping", what="route")
            text = lp.metrics()
    finally:
        backend.close()
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    wanted = _names_in(_dashboard_exprs()) | _names_in([r["expr"] for r in rules])
    # A family with no sample yet (no Docker event, no route in error) still has its # TYPE
    # line: compare family names, without the sample suffixes.
    declared = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
    families = {
        re.sub(r"_(bucket|sum|count|total|created)$", "", n)
        for n in _exposed_names(text) | declared
    }
    missing = {n for n in wanted if re.sub(r"_(bucket|sum|count|total)$", "", n) not in families}
    assert not missing, f"not exposed by a running labelproxy: {sorted(missing)}"


@pytest.mark.parametrize("path", ["compose.yaml", "deploy/compose.socket-proxy.yaml"])
def test_compose_accepts_the_compose_files(path: str) -> None:
    done = _run(*_compose_cmd(), "-f", path, "config", "--quiet")
    assert done.returncode == 0, done.stderr


def test_compose_demo_labels_reach_the_containers() -> None:
    cmd = _compose_cmd()
    if cmd[0] != "docker":
        pytest.skip("needs compose v2 for --format json")
    done = _run(*cmd, "-f", "compose.yaml", "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    lp = services["labelproxy"]
    assert lp["network_mode"] == "host"
    # the kernel fast path: CAP_NET_ADMIN, which Docker grants only to root in the container
    assert (lp["user"], lp["cap_add"], lp["cap_drop"]) == ("0:0", ["NET_ADMIN"], ["ALL"])
    assert any(v["target"] == "/var/run/docker.sock" and v.get("read_only")
               for v in lp["volumes"])  # fmt: skip
    assert lp["environment"]["LABELPROXY_DRAIN_TIMEOUT"] == "30s"
    assert lp["stop_grace_period"] == "40s"
    assert services["echo"]["labels"]["proxy.echo.port"] == "7000:7001"
    assert services["udp-echo"]["labels"]["proxy.udpecho.scheme"] == "udp"


def test_swarm_stack_file_is_accepted() -> None:
    done = _run(*_compose_cmd(), "-f", "deploy/stack.yml", "config", "--quiet")
    assert done.returncode == 0, done.stderr
    if shutil.which("docker"):
        stack = _run("docker", "stack", "config", "-c", "deploy/stack.yml")
        if stack.returncode == 0 or "unknown command" not in stack.stderr:
            assert stack.returncode == 0, stack.stderr
            assert "mode: global" in stack.stdout


def test_systemd_unit_is_valid() -> None:
    analyze = shutil.which("systemd-analyze")
    unit = DEPLOY / "labelproxy.service"
    text = unit.read_text()
    for line in ("ExecStart=/usr/local/bin/labelproxy", "KillSignal=SIGTERM",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE", "EnvironmentFile=-/etc/default/"):
        assert line in text  # fmt: skip
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    done = _run(analyze, "verify", str(unit))
    complaints = [
        line for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "/usr/local/bin/labelproxy" not in line  # not installed here
    ]  # fmt: skip
    assert not complaints, complaints


def test_demo_echo_script_echoes_tcp_and_udp(tmp_path: Path) -> None:
    """The demo backends of compose.yaml, run as plain processes on loopback."""
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    script = str(DEPLOY / "demo" / "echo.py")
    procs = [
        subprocess.Popen(["python3", script, "tcp", "127.0.0.1", str(tcp_port)]),
        subprocess.Popen(["python3", script, "udp", "127.0.0.1", str(udp_port)]),
    ]
    try:
        assert wait_for(lambda: echo_roundtrip(tcp_port, b"hello") == b"hello", what="tcp echo")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(0.5)

            def udp_echo() -> bool:
                udp.sendto(b"hi", ("127.0.0.1", udp_port))
                return udp.recv(100) == b"hi"

            assert wait_for(udp_echo, what="udp echo")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
