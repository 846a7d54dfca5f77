"""`labelproxy check`: the shipped compose.yaml is clean, a broken copy reports each planted
problem with its service, label and value, and running containers of a real engine are linted.

Compose readers are run as a user would meet them: `labelproxy check --compose` as a subprocess
whose PATH holds only the tools a test chooses, and (for "docker without the compose plugin")
the real docker CLI in a private mount namespace where an empty directory is mounted over its
plugin directories, so `docker compose` really is missing. Conflicts between services are
predicted as Compose creates containers, and checked against a real `docker compose up`."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path

import docker
import pytest

from labelproxy.lint.check import check_compose, check_running, render, run_check
from labelproxy.lint.compose import ComposeError, load_compose, project_from_config, views_of
from labelproxy.lint.composeorder import settle
from labelproxy.lint.composeread import load_yaml
from labelproxy.sources.containers import DiscoveryContext, PortBinding
from labelproxy.sources.desired import build_desired
from labelproxy.spec import ListenKey
from tests.support.dockerd import PrivateDockerd, run_container
from tests.support.lp import free_port

ROOT = Path(__file__).resolve().parents[2]

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


def test_compose_cli_reads_a_file_given_by_a_relative_path_in_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _have_compose_cli():
        pytest.skip("no compose CLI (bash tests/support/install_compose.sh)")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "compose.yaml").write_text(
        "services:\n  a:\n    image: busybox\n    labels: {proxy.a.port: '7010:1'}\n"
    )
    monkeypatch.chdir(tmp_path)
    project = load_compose(Path("sub/compose.yaml"))
    assert project.reader != "yaml" and project.name == "sub"
    assert project.services[0].labels == {"proxy.a.port": "7010:1"}


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


# --- which Compose reads the file -------------------------------------------------------------

PLUGIN_DIRS = (
    "/usr/local/lib/docker/cli-plugins", "/usr/local/libexec/docker/cli-plugins",
    "/usr/lib/docker/cli-plugins", "/usr/libexec/docker/cli-plugins",
)  # fmt: skip
# Mount an empty directory over each docker CLI plugin directory, then run the command.
HIDE_PLUGINS = 'e=$1; shift; for d in $LP_HIDE; do "$LP_MOUNT" --bind "$e" "$d" || exit 97; done\n'
HIDE_PLUGINS += 'exec "$@"'

# Unquoted `2224:22` is a YAML 1.1 base-60 int (133462) but a string in Compose v2 (YAML 1.2):
# in a label map value, in `ports`, and beside a list label and a merged `x-` anchor.
SEXAGESIMAL = """\
x-loopback: &loopback
  proxy.ssh.bind: 127.0.0.1
services:
  ssh:
    image: busybox
    ports:
      - 2222:22
    labels:
      <<: *loopback
      proxy.ssh.port: 2224:22
  git:
    image: busybox
    network_mode: host
    labels:
      - proxy.git.port=2225:22
      - proxy.git.scheme=tcp
"""
SEXAGESIMAL_ROWS = [
    ("tcp://127.0.0.1:2224", "ssh", "127.0.0.1:2222"),
    ("tcp://[::]:2225", "git", "127.0.0.1:22"),
]


def _real_docker() -> str | None:
    path = shutil.which("docker")
    return os.path.realpath(path) if path else None


def _compose_binary(major: str) -> str | None:
    """A docker-compose binary of this major version ("1" Debian's, "2" the Go one), if any."""
    candidates = [os.path.join(d, "docker-compose") for d in PLUGIN_DIRS]
    candidates += [p for p in (shutil.which("docker-compose"), "/usr/bin/docker-compose") if p]
    for path in dict.fromkeys(os.path.realpath(c) for c in candidates):
        if not os.access(path, os.X_OK):
            continue
        done = subprocess.run(
            [path, "version", "--short"], capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode == 0 and done.stdout.strip().removeprefix("v").startswith(major + "."):
            return path
    return None


def _can_hide_plugins() -> str | None:
    """Why a private mount namespace cannot be had here (None: it can)."""
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("mount") is None:
        return "needs unshare(1) and mount(8)"
    done = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "true"], capture_output=True, check=False
    )
    return None if done.returncode == 0 else "cannot create a mount namespace (needs root)"


def _run_with_tools(
    cmd: list[str], tmp_path: Path, *, tools: Mapping[str, str], hide_plugins: bool
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` with a PATH holding only `tools` (name -> binary), an empty DOCKER_CONFIG and,
    when asked, every docker CLI plugin directory hidden behind an empty one."""
    home = Path(tempfile.mkdtemp(prefix="tools-", dir=tmp_path))
    (home / "bin").mkdir()
    (home / "docker-config").mkdir()
    (home / "empty").mkdir()
    for name, binary in tools.items():
        try:  # not a symlink: the binary may live in a plugin directory that gets hidden
            os.link(binary, home / "bin" / name)
        except OSError:
            shutil.copy2(binary, home / "bin" / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env |= {"PATH": str(home / "bin"), "DOCKER_CONFIG": str(home / "docker-config")}
    if hide_plugins:
        env |= {
            "LP_HIDE": " ".join(d for d in PLUGIN_DIRS if Path(d).is_dir()),
            "LP_MOUNT": shutil.which("mount") or "mount",
        }
        cmd = [
            shutil.which("unshare") or "unshare", "--mount", "--propagation", "private",
            "/bin/sh", "-c", HIDE_PLUGINS, "sh", str(home / "empty"), *cmd,
        ]  # fmt: skip
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _check_cli(
    path: Path, tmp_path: Path, *, tools: Mapping[str, str], hide_plugins: bool = False
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "labelproxy", "check", "--compose", str(path)]
    return _run_with_tools(cmd, tmp_path, tools=tools, hide_plugins=hide_plugins)


def _assert_rows(report: str, rows: list[tuple[str, str, str]]) -> None:
    lines = report.split("PROBLEMS", 1)[0].splitlines()
    for listen, alias, target in rows:
        assert any(ln.split()[:1] == [listen] and alias in ln.split() and target in ln.split()
                   for ln in lines), (listen, alias, target, report)  # fmt: skip


def test_check_compose_with_docker_lacking_the_compose_plugin_reads_the_yaml(
    tmp_path: Path,
) -> None:
    """Debian's docker.io / a bare Docker 28: `docker compose -f` is `unknown shorthand flag`."""
    docker_cli, why = _real_docker(), _can_hide_plugins()
    if docker_cli is None or why:
        pytest.skip(why or "no docker CLI")
    probe = _run_with_tools(
        ["docker", "compose", "version"], tmp_path, tools={"docker": docker_cli},
        hide_plugins=True,
    )  # fmt: skip
    assert probe.returncode not in (0, 97), probe  # the plugin is really gone
    path = tmp_path / "compose.yaml"
    path.write_text(SEXAGESIMAL)
    done = _check_cli(path, tmp_path, tools={"docker": docker_cli}, hide_plugins=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unknown shorthand flag" not in done.stdout + done.stderr
    assert "read by labelproxy as YAML (docker has no compose plugin, no docker-compose on PATH)" \
        in done.stderr, done.stderr  # fmt: skip
    _assert_rows(done.stdout, SEXAGESIMAL_ROWS)
    assert "133462" not in done.stdout


def test_check_compose_with_no_docker_at_all_reads_the_yaml(tmp_path: Path) -> None:
    path = tmp_path / "compose.yaml"
    path.write_text(SEXAGESIMAL)
    done = _check_cli(path, tmp_path, tools={})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "as YAML (no docker on PATH, no docker-compose on PATH)" in done.stderr, done.stderr
    _assert_rows(done.stdout, SEXAGESIMAL_ROWS)
    assert "133462" not in done.stdout


def test_check_compose_falls_back_to_a_standalone_docker_compose_v2(tmp_path: Path) -> None:
    docker_cli, compose, why = _real_docker(), _compose_binary("2"), _can_hide_plugins()
    if docker_cli is None or compose is None or why:
        pytest.skip(why or "needs docker and Compose v2 (bash tests/support/install_compose.sh)")
    path = tmp_path / "compose.yaml"
    path.write_text(SEXAGESIMAL)
    tools = {"docker": docker_cli, "docker-compose": compose}
    done = _check_cli(path, tmp_path, tools=tools, hide_plugins=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "read by docker-compose config (docker-compose 2." in done.stderr, done.stderr
    assert "docker has no compose plugin" in done.stderr
    assert "read by docker-compose config" in done.stdout.splitlines()[0]
    _assert_rows(done.stdout, SEXAGESIMAL_ROWS)


def test_check_compose_with_debian_docker_compose_v1_explains_its_base_60_reading(
    tmp_path: Path,
) -> None:
    """Compose v1 itself reads unquoted 2224:22 as 133462: `check` shows what v1 would deploy
    and says why, with the line to quote."""
    compose = _compose_binary("1")
    if compose is None:
        pytest.skip("no Compose v1 (Debian's docker-compose package)")
    path = tmp_path / "compose.yaml"
    path.write_text(SEXAGESIMAL)
    done = _check_cli(path, tmp_path, tools={"docker-compose": compose})
    assert "read by docker-compose config (docker-compose 1." in done.stderr, done.stderr
    assert done.returncode == 1, done.stdout
    problems = done.stdout.split("PROBLEMS", 1)[1].split("WARNINGS", 1)[0]
    assert "proxy.ssh.port='133462'" in problems
    warnings = done.stdout.split("WARNINGS", 1)[1]
    assert "line 10: docker-compose v1 (YAML 1.1) reads unquoted 2224:22 as the base-60 " \
        "number 133462" in warnings, warnings  # fmt: skip
    _assert_rows(done.stdout, SEXAGESIMAL_ROWS[1:])  # the list label is a string even in v1


def test_check_compose_uses_the_docker_compose_plugin_first(tmp_path: Path) -> None:
    docker_cli, compose = _real_docker(), _compose_binary("2")
    if docker_cli is None or not _have_plugin():
        pytest.skip("the docker CLI has no compose plugin (tests/support/install_compose.sh)")
    path = tmp_path / "compose.yaml"
    path.write_text(SEXAGESIMAL)
    tools = {"docker": docker_cli, **({"docker-compose": compose} if compose else {})}
    done = _check_cli(path, tmp_path, tools=tools)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "read by docker compose config (Compose 2." in done.stderr, done.stderr
    _assert_rows(done.stdout, SEXAGESIMAL_ROWS)


def _have_plugin() -> bool:
    return any(Path(d, "docker-compose").exists() for d in PLUGIN_DIRS) and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False
    ).returncode == 0


def test_yaml_reader_resolves_scalars_as_compose_v2() -> None:
    doc = load_yaml(textwrap.dedent("""\
        port: 2224:22
        list: [2224:22, "2224:22", 1:30:00]
        words: [yes, no, on, off, y, n]
        bools: [true, false, True]
        numbers: [22, 0x1F, 0o17, 1.5, -3]
        empty: ~
        eq: =
        """))  # fmt: skip
    assert doc["port"] == "2224:22"
    assert doc["list"] == ["2224:22", "2224:22", "1:30:00"]
    assert doc["words"] == ["yes", "no", "on", "off", "y", "n"]
    assert doc["bools"] == [True, False, True]
    assert doc["numbers"] == [22, 31, 15, 1.5, -3]
    assert doc["empty"] is None and doc["eq"] == "="


def test_yaml_reader_merges_anchors_and_interpolates_like_compose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("# ports\nLISTEN=7100\nexport TARGET='7001'\nBIND=0.0.0.0\n")
    monkeypatch.setenv("BIND", "127.0.0.1")  # the environment wins over .env
    monkeypatch.delenv("UNSET", raising=False)
    path = tmp_path / "compose.yaml"
    path.write_text(textwrap.dedent("""\
        x-base: &base
          image: busybox
          network_mode: host
        x-opts: &opts
          proxy.echo.bind: ${BIND}
          proxy.echo.idle_timeout: ${UNSET:-5m}
        services:
          echo:
            <<: *base
            labels:
              <<: *opts
              proxy.echo.port: ${LISTEN}:$TARGET
              proxy.echo.note: costs $$5
          debug:
            <<: *base
            profiles: [debug]
            labels: {proxy.echo.port: "${LISTEN}:1"}
        """))
    project = load_compose(path, use_cli=False)
    assert project.reader == "yaml"
    assert [s.name for s in project.services] == ["echo"]  # inactive profile left out
    labels = project.services[0].labels
    assert labels["proxy.echo.port"] == "7100:7001"
    assert labels["proxy.echo.bind"] == "127.0.0.1"
    assert labels["proxy.echo.idle_timeout"] == "5m"
    assert labels["proxy.echo.note"] == "costs $5"
    assert project.services[0].network_mode == "host"
    monkeypatch.setenv("COMPOSE_PROFILES", "debug")
    assert len(load_compose(path, use_cli=False).services) == 2
    path.write_text("services:\n  a:\n    labels: {proxy.a.port: '${NEED:?set NEED}'}\n")
    with pytest.raises(ComposeError, match="required variable NEED is missing: set NEED"):
        load_compose(path, use_cli=False)


# --- who holds a contested port -----------------------------------------------------------------

ORDER = """\
services:
  second:                  # listed first, but depends on `first`: created after it
    image: busybox
    network_mode: host
    depends_on: [first]
    labels: {proxy.two.port: "PORT_A:81"}
  first:
    image: busybox
    network_mode: host
    labels: {proxy.one.port: "PORT_A:80"}
  left:                    # left and right: no order between them
    image: busybox
    network_mode: host
    labels: {proxy.l.port: "PORT_B:80"}
  right:
    image: busybox
    network_mode: host
    labels: ["proxy.r.port=PORT_B:81"]
  pool:                    # replicas of one service: one listener, not a conflict
    image: busybox
    network_mode: host
    scale: 2
    labels: {proxy.pool.port: "PORT_C:80"}
"""


def _order_file(tmp_path: Path, a: int = 9201, b: int = 9202, c: int = 9203) -> Path:
    path = tmp_path / "compose.yaml"
    path.write_text(
        ORDER.replace("PORT_A", str(a)).replace("PORT_B", str(b)).replace("PORT_C", str(c))
    )
    return path


@pytest.mark.parametrize("use_cli", [True, False], ids=["compose-cli", "yaml-fallback"])
def test_conflict_winner_follows_depends_on_else_creation_order_is_named(
    tmp_path: Path, use_cli: bool
) -> None:
    if use_cli and not _have_compose_cli():
        pytest.skip("no compose CLI (bash tests/support/install_compose.sh)")
    result = check_compose(_order_file(tmp_path), label_prefix="proxy", use_cli=use_cli)
    holders = {str(k): s.alias for k, s in result.state.routes.items()}
    assert holders == {"tcp://[::]:9201": "one", "tcp://[::]:9202": "l", "tcp://[::]:9203": "pool"}
    by_source = {p.source: p for p in result.problems}
    assert set(by_source) == {"second", "right"}, result.problems
    assert "second depends on first, so Compose creates first first" in by_source["second"].message
    assert "creation order decides: neither of left and right depends on the other" \
        in by_source["right"].message  # fmt: skip
    assert result.undecided == {ListenKey("tcp", "::", 9202): ("right",)}
    table = render(result).split("PROBLEMS", 1)[0]
    assert any("tcp://[::]:9202" in ln and "(or right: whichever is created first)" in ln
               for ln in table.splitlines()), table  # fmt: skip
    assert "or second" not in table


def test_a_service_that_depends_on_a_claimant_is_never_named_as_a_possible_holder() -> None:
    project = project_from_config(
        {"services": {
            "a": {"network_mode": "host", "labels": {"proxy.a.port": "9300:1"}},
            "b": {"network_mode": "host", "labels": {"proxy.b.port": "9300:2"},
                  "depends_on": {"a": {"condition": "service_started"}}},
            "c": {"network_mode": "host", "labels": {"proxy.c.port": "9300:3"}},
        }},
        default_name="p",
    )  # fmt: skip
    views, ctx = views_of(project), DiscoveryContext()
    settled = settle(project, views, ctx, build_desired(views, ctx))
    assert settled.undecided == {ListenKey("tcp", "::", 9300): ("c",)}


def test_check_predicts_the_holder_a_real_compose_up_gives(
    tmp_path: Path, dockerd: PrivateDockerd, docker_client: docker.DockerClient,
    busybox_image: str,
) -> None:  # fmt: skip
    if not _have_plugin():
        pytest.skip("the docker CLI has no compose plugin (tests/support/install_compose.sh)")
    a, b, c = free_port(), free_port(), free_port()
    text = _order_file(tmp_path, a, b, c).read_text().replace("image: busybox", (
        f"image: {busybox_image}\n    pull_policy: never\n    init: true\n"
        "    command: [sleep, '120']"
    ))  # fmt: skip
    path = tmp_path / "compose.yaml"
    path.write_text(text)
    predicted = check_compose(path, label_prefix="proxy")
    up = ["compose", "-p", "lp-check-order", "-f", str(path)]
    try:
        dockerd.cli(*up, "up", "-d", "--no-build", timeout=180)
        running = check_running(docker_host=dockerd.host, label_prefix="proxy")
    finally:
        dockerd.cli(*up, "down", "-t", "0", check=False, timeout=180)
    served = {str(k): s.alias for k, s in running.state.routes.items()}
    assert served[f"tcp://[::]:{a}"] == "one"  # depends_on: predicted and served alike
    assert predicted.state.routes[ListenKey("tcp", "::", a)].alias == "one"
    assert served[f"tcp://[::]:{c}"] == "pool"
    assert not any(p.source.startswith("lp-check-order-pool") for p in running.problems)
    # no order between left and right: whichever the engine created first, check named both
    assert served[f"tcp://[::]:{b}"] in ("l", "r")
    names = {predicted.state.routes[ListenKey("tcp", "::", b)].source.rsplit("/", 1)[-1],
             *predicted.undecided[ListenKey("tcp", "::", b)]}  # fmt: skip
    assert names == {"left", "right"}


def test_check_shows_each_routes_forwarding_path_and_why_the_relay(tmp_path: Path) -> None:
    compose = tmp_path / "compose.yaml"
    compose.write_text(textwrap.dedent("""\
        services:
          plain:
            image: x
            network_mode: host
            labels: {proxy.plain.port: "9401:1"}
          asked:
            image: x
            network_mode: host
            labels: {proxy.asked.port: "9402:2", proxy.asked.forwarding: relay}
          header:
            image: x
            network_mode: host
            labels: {proxy.header.port: "9403:3", proxy.header.proxy_protocol: v2}
          bad:
            image: x
            network_mode: host
            labels: {proxy.bad.port: "9404:4", proxy.bad.forwarding: kernel}
    """))
    result = check_compose(compose, label_prefix="proxy", use_cli=False)
    rows = {line.split()[0]: line for line in render(result).splitlines()
            if line.startswith("tcp://")}
    assert rows["tcp://[::]:9401"].endswith("kernel")
    assert rows["tcp://[::]:9402"].endswith("relay: forwarding: relay asked for by the route")
    assert rows["tcp://[::]:9403"].endswith("relay: proxy_protocol v2 writes a header upstream")
    [problem] = result.problems
    assert (problem.label, problem.value) == ("proxy.bad.forwarding", "kernel")


def test_the_report_shows_each_routes_health_check(tmp_path: Path) -> None:
    path = tmp_path / "compose.yaml"
    path.write_text(textwrap.dedent("""
        services:
          cache:
            network_mode: host
            labels:
              proxy.cache.port: "9401:6379"
              proxy.cache.healthcheck: redis
              proxy.cache.healthcheck.interval: 1s
          dns:
            network_mode: host
            labels:
              proxy.dns.port: "9402:53"
              proxy.dns.scheme: udp
    """))
    table = render(check_compose(path, label_prefix="proxy", use_cli=False))
    rows = {ln.split()[2]: ln for ln in table.splitlines() if "://" in ln}
    assert "redis interval=1s timeout=1s rise=2 fall=3" in rows["cache"], table
    assert " none " in rows["dns"], table
