"""`labelproxy check`: the shipped compose.yaml is clean, a broken copy reports each planted
problem with its service, label and value, and running containers of a real engine are linted."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import docker
import pytest

from labelproxy.check import check_compose, run_check
from labelproxy.compose import load_compose, project_from_config, views_of
from labelproxy.containers import PortBinding
from tests.support.dockerd import PrivateDockerd, run_container
from tests.support.lp import free_port

ROOT = Path(__file__).resolve().parent.parent

BROKEN = """\
name: broken
services:
  web:                       # bad port value
    image: busybox
    network_mode: host
    labels:
      proxy.web.port: "abc"
  dns:                       # unknown scheme, labels as a list
    image: busybox
    network_mode: host
    labels:
      - proxy.dns.port=5353:53
      - proxy.dns.scheme=sctp
  first:                     # holds 9000
    image: busybox
    network_mode: host
    labels:
      proxy.one.port: "9000:80"
  second:                    # claims 9000 too: conflict
    image: busybox
    network_mode: host
    labels:
      - "proxy.two.port=9000:81"
  swarmy:                    # proxy labels only in deploy.labels: never reach the container
    image: busybox
    network_mode: host
    deploy:
      labels:
        proxy.sw.port: "9100:80"
  bridged:                   # target neither published nor on labelproxy's network: warning
    image: busybox
    expose: ["6379"]
    labels:
      proxy.redis.port: "6380:6379"
  published:                 # fine: dialled through its published port
    image: busybox
    ports: ["127.0.0.1:16379:6379"]
    labels:
      proxy.pub.port: "6381:6379"
"""

PLANTED = [  # (service, label, value)
    ("web", "proxy.web.port", "abc"),
    ("dns", "proxy.dns.scheme", "sctp"),
    ("second", "proxy.two.port", "9000:81"),
    ("swarmy", "deploy.labels.proxy.sw.port", "9100:80"),
]


def _have_compose_cli() -> bool:
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False
    ).returncode == 0:
        return True
    return shutil.which("docker-compose") is not None


def _check(path: Path | None, *, docker_host: str = "none") -> tuple[int, str]:
    out = io.StringIO()
    rc = run_check(compose_file=path, docker_host=docker_host, label_prefix="proxy", out=out)
    return rc, out.getvalue()


def test_shipped_compose_file_has_no_problem() -> None:
    rc, report = _check(ROOT / "compose.yaml")
    assert rc == 0, report
    assert "0 problem(s)" in report
    lines = report.splitlines()
    assert any("tcp://127.0.0.1:7000" in ln and "echo" in ln and "127.0.0.1:7001" in ln
               for ln in lines), report  # fmt: skip
    assert any("udp://127.0.0.1:5300" in ln and "udpecho" in ln and "127.0.0.1:5301" in ln
               for ln in lines), report  # fmt: skip


def test_cli_check_compose_exits_zero_on_the_shipped_file() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "labelproxy", "check", "--compose", "compose.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "udpecho" in done.stdout


@pytest.mark.parametrize("use_cli", [True, False], ids=["compose-cli", "yaml-fallback"])
def test_broken_compose_reports_every_planted_problem(tmp_path: Path, use_cli: bool) -> None:
    if use_cli and not _have_compose_cli():
        pytest.skip("no compose CLI (bash tests/support/install_compose.sh)")
    path = tmp_path / "compose.yaml"
    path.write_text(BROKEN)
    result = check_compose(path, label_prefix="proxy", use_cli=use_cli)
    assert not result.ok
    found = {(p.source, p.label, p.value) for p in result.problems}
    for planted in PLANTED:
        assert planted in found, (planted, found)
    assert len(result.problems) == len(PLANTED), result.problems
    conflict = next(p for p in result.problems if p.source == "second")
    assert conflict.kind == "conflict" and "first" in conflict.message
    # the good routes are still there; the deploy.labels-only one is not
    routes = {(str(k), s.alias) for k, s in result.state.routes.items()}
    assert ("tcp://[::]:9000", "one") in routes
    assert ("tcp://[::]:6381", "pub") in routes
    assert all(alias != "sw" for _, alias in routes)
    pub = next(s for s in result.state.routes.values() if s.alias == "pub")
    assert [str(b) for b in pub.backends] == ["127.0.0.1:16379"]
    # the bridge trap is a warning naming the service, label and value
    assert [(w.source, w.label, w.value) for w in result.warnings] == [
        ("bridged", "proxy.redis.port", "6380:6379")
    ]


def test_broken_compose_report_and_exit_status(tmp_path: Path) -> None:
    path = tmp_path / "compose.yaml"
    path.write_text(BROKEN)
    rc, report = _check(path)
    assert rc == 1
    problems = report.split("PROBLEMS", 1)[1].split("WARNINGS", 1)[0]
    for service, label, value in PLANTED:
        assert any(service in ln and label in ln and repr(value) in ln
                   for ln in problems.splitlines()), (service, label, report)  # fmt: skip
    assert "bridged" in report.split("WARNINGS", 1)[1]


def test_unreadable_compose_file_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "compose.yaml"
    path.write_text("services: [oops\n")
    rc, report = _check(path)
    assert rc == 1
    assert "labelproxy check:" in report
    rc, report = _check(tmp_path / "missing.yaml")
    assert rc == 1 and "no such file" in report


def test_listen_port_taken_on_the_host_is_a_warning(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        path = tmp_path / "compose.yaml"
        path.write_text(textwrap.dedent(f"""\
            services:
              dns:
                image: busybox
                network_mode: host
                labels:
                  proxy.dns.port: "{port}:53"
                  proxy.dns.scheme: udp4
                  proxy.dns.bind: 127.0.0.1
            """))
        rc, report = _check(path)
    assert rc == 0, report  # warnings do not change the exit status
    warnings = report.split("WARNINGS", 1)[1]
    assert f"udp://127.0.0.1:{port}" in warnings and "already in use" in warnings


@pytest.mark.parametrize(
    ("ports", "expose", "expected"),
    [
        (["8080:80"], [], {PortBinding(80, "tcp", "", 8080)}),
        (["127.0.0.1:5353:53/udp"], [], {PortBinding(53, "udp", "127.0.0.1", 5353)}),
        (["9000-9001:90-91"], [], {PortBinding(90, "tcp", "", 9000),
                                   PortBinding(91, "tcp", "", 9001)}),
        (["3000"], [], {PortBinding(3000, "tcp")}),  # random host port: not known here
        ([{"target": 53, "published": "53", "protocol": "udp", "host_ip": "::1"}], [],
         {PortBinding(53, "udp", "::1", 53)}),
        ([], ["6379", "7000-7001/udp"], {PortBinding(6379, "tcp"), PortBinding(7000, "udp"),
                                         PortBinding(7001, "udp")}),
    ],
)  # fmt: skip
def test_compose_ports_short_and_long_syntax(
    ports: list[object], expose: list[str], expected: set[PortBinding]
) -> None:
    project = project_from_config(
        {"services": {"s": {"image": "x", "ports": ports, "expose": expose}}}, default_name="p"
    )
    assert set(project.services[0].ports) == expected


def test_compose_views_group_services_in_file_order() -> None:
    project = project_from_config(
        {
            "name": "Demo",
            "services": {
                "b": {"labels": ["proxy.b.port=1:1"], "networks": ["front", "back"]},
                "a": {"labels": {"proxy.a.port": 2}, "network_mode": "host", "scale": 3},
            },
            "networks": {"front": {"name": "shared-front"}},
        },
        default_name="x",
    )
    views = views_of(project)
    assert [v.name for v in views] == ["b", "a"]
    assert views[0].created < views[1].created
    assert views[0].service == "compose:demo/b"
    assert dict(views[0].networks) == {"demo_back": "b@demo_back", "shared-front": "b@shared-front"}
    assert views[1].network_mode == "host" and views[1].labels == {"proxy.a.port": "2"}
    assert project.services[1].replicas == 3


def test_compose_cli_interpolates_like_compose(tmp_path: Path) -> None:
    if not _have_compose_cli():
        pytest.skip("no compose CLI (bash tests/support/install_compose.sh)")
    (tmp_path / ".env").write_text("ECHO_PORT=7777\n")
    path = tmp_path / "compose.yaml"
    path.write_text(textwrap.dedent("""\
        services:
          echo:
            image: busybox
            network_mode: host
            labels:
              proxy.echo.port: "${ECHO_PORT}:7001"
        """))
    project = load_compose(path)
    assert project.reader != "yaml"
    assert project.services[0].labels["proxy.echo.port"] == "7777:7001"


def test_check_running_containers_of_a_real_engine(
    dockerd: PrivateDockerd, docker_client: docker.DockerClient, busybox_image: str
) -> None:
    good_port, bad_name = free_port(), "lp-check-bad"
    run_container(
        docker_client, busybox_image, name="lp-check-good",
        labels={"proxy.good.port": f"{good_port}:7001", "proxy.good.bind": "127.0.0.1"},
        command=["sleep", "60"],
    )  # fmt: skip
    run_container(
        docker_client, busybox_image, name=bad_name,
        labels={"proxy.bad.port": "70000"}, command=["sleep", "60"],
    )  # fmt: skip
    network = docker_client.networks.create("lp-check-net", driver="bridge")
    hidden = docker_client.containers.create(
        busybox_image, ["sleep", "60"], name="lp-check-hidden", init=True,
        labels={"proxy.hidden.port": "6390:6379"}, network="lp-check-net",
    )  # fmt: skip
    hidden.start()
    assert network.name == "lp-check-net"
    rc, report = _check(None, docker_host=dockerd.host)
    assert rc == 1, report
    routes = report.split("PROBLEMS", 1)[0]
    assert any(f"tcp://127.0.0.1:{good_port}" in ln and "127.0.0.1:7001" in ln
               for ln in routes.splitlines()), report  # fmt: skip
    problems = report.split("PROBLEMS", 1)[1].split("WARNINGS", 1)[0]
    assert any(bad_name in ln and "proxy.bad.port" in ln and "'70000'" in ln
               for ln in problems.splitlines()), report  # fmt: skip
    warnings = report.split("WARNINGS", 1)[1]
    assert "lp-check-hidden" in warnings and "lp-check-net" in warnings


def test_check_running_reports_an_unreachable_engine(tmp_path: Path) -> None:
    rc, report = _check(None, docker_host=f"unix://{tmp_path}/nope.sock")
    assert rc == 1 and "cannot list the containers" in report
