"""Wake-on-demand labels (sources/sleeplabels.py) and the routes of asleep containers."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from labelproxy.sources.containers import ContainerView, DiscoveryContext
from labelproxy.sources.desired import build_desired
from labelproxy.sources.labels import parse_container
from labelproxy.sources.sleeplabels import compose_depends_on
from labelproxy.spec import Sleep

CTX = DiscoveryContext()


def view(labels: Mapping[str, str], *, state: str = "running") -> ContainerView:
    return ContainerView(
        id="c0ffee", name="mc", created=1.0, labels=labels, network_mode="host", state=state
    )


BASE = {"proxy.aliases": "game", "proxy.game.port": "25565:25566", "proxy.game.scheme": "tcp"}


def test_container_labels_give_every_route_its_sleep() -> None:
    labels = {
        **BASE, "proxy.idle_timeout": "2s", "proxy.wake_timeout": "30s",
        "proxy.stop_method": "pause", "proxy.stop_timeout": "5s", "proxy.stop_signal": "int",
        "proxy.depends_on": "db, cache", "proxy.wake_on": "data",
        "proxy.game.idle_timeout": "90s",  # a connection's idle timeout, unrelated
    }  # fmt: skip
    [spec], problems = parse_container(view(labels), CTX)
    assert problems == ()
    assert spec.options.idle_timeout == 90.0
    assert spec.options.sleep == Sleep(
        container_id="c0ffee", container_name="mc", idle_timeout=2.0, wake_timeout=30.0,
        stop_method="pause", stop_timeout=5.0, stop_signal="SIGINT", depends_on=("db", "cache"),
        wake_on="data",
    )  # fmt: skip


def test_defaults_and_compose_depends_on_fallback() -> None:
    labels = {
        **BASE, "proxy.idle_timeout": "10m",
        "com.docker.compose.depends_on": "db:service_started:false,redis:service_healthy:true",
    }  # fmt: skip
    [spec], _ = parse_container(view(labels), CTX)
    sleep = spec.options.sleep
    assert sleep is not None
    assert (sleep.wake_timeout, sleep.stop_method, sleep.stop_timeout) == (180.0, "stop", 60.0)
    assert (sleep.wake_on, sleep.depends_on) == ("connect", ("db", "redis"))
    assert compose_depends_on("") == ()


@pytest.mark.parametrize(
    ("label", "value", "expected"),
    [
        ("idle_timeout", "soon", "duration"),
        ("wake_timeout", "0s", "positive duration"),
        ("stop_method", "hibernate", "expected one of stop, pause, kill"),
        ("stop_signal", "SIGNOPE", "signal name"),
        ("depends_on", "db,,x", "comma list"),
        ("depends_on", "db,db", "listed twice"),
        ("wake_on", "syn", "expected one of connect, data"),
    ],
)
def test_bad_value_is_one_problem_and_the_routes_serve_without_sleep(
    label: str, value: str, expected: str
) -> None:
    labels = {**BASE, "proxy.idle_timeout": "1m", f"proxy.{label}": value}
    [spec], problems = parse_container(view(labels), CTX)
    assert spec.options.sleep is None
    [problem] = problems
    assert problem.label == f"proxy.{label}" and problem.value == value
    assert expected in problem.message and "without sleep" in problem.message


@pytest.mark.parametrize("state", ["exited", "paused", "created"])
def test_stopped_sleep_enabled_container_keeps_its_route_asleep(state: str) -> None:
    asleep = view({**BASE, "proxy.idle_timeout": "1m"}, state=state)
    plain = ContainerView(
        id="beef", name="web", created=2.0, network_mode="host", state=state,
        labels={"proxy.aliases": "web", "proxy.web.port": "8080:8081", "proxy.web.scheme": "tcp"},
    )  # fmt: skip
    desired = build_desired([asleep, plain], CTX)
    [spec] = desired.routes.values()  # the plain stopped container gives nothing
    assert spec.alias == "game" and spec.backends == ()
    assert spec.options.sleep is not None and spec.options.sleep.asleep
    assert desired.problems == ()


def test_replicas_with_the_same_sleep_settings_are_no_conflict() -> None:
    labels = {**BASE, "proxy.idle_timeout": "1m", "com.docker.compose.project": "p",
              "com.docker.compose.service": "mc"}  # fmt: skip
    first = ContainerView(id="a1", name="p-mc-1", created=1.0, labels=labels,
                          network_mode="host", service="compose:p/mc")  # fmt: skip
    second = ContainerView(id="b2", name="p-mc-2", created=2.0, labels=labels,
                           network_mode="host", service="compose:p/mc")  # fmt: skip
    desired = build_desired([first, second], CTX)
    assert desired.problems == ()
    [spec] = desired.routes.values()
    assert spec.options.sleep is not None and spec.options.sleep.container_id == "a1"
