"""Container-level wake-on-demand labels -> a `spec.Sleep` (pure: no I/O, no docker import).

GoDoxy's names, at container level (`proxy.<label>`, beside `aliases`):

- `idle_timeout`: a duration; enables sleep (no connection, no UDP session and no byte for
  this long: the container is stopped). Not to be confused with `<alias>.idle_timeout`, a
  connection's own idle timeout.
- `wake_timeout` (default `3m`): how long clients are held while the container starts.
- `stop_method`: `stop` (default), `pause` or `kill`; `stop_timeout` (default `1m`): the grace
  `stop` gives before it kills; `stop_signal`: the signal `stop` or `kill` sends (`SIGTERM`,
  `INT`, `15`...; default: the image's).
- `depends_on`: containers or compose services started first, in order (comma list); falls
  back to `com.docker.compose.depends_on` (its service names).
- `wake_on`: `connect` (default) or `data` (a TCP client must send a byte first, so a port scan
  that connects and closes boots nothing).

A bad value is one `Problem` naming the label; the container's routes are then served without
sleep (nothing is ever stopped on a guess).
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Mapping
from typing import cast

from labelproxy.spec import Problem, Sleep, StopMethod, WakeOn
from labelproxy.units import parse_positive_duration

logger = logging.getLogger(__name__)

SLEEP_LABELS = (
    "idle_timeout", "wake_timeout", "stop_method", "stop_timeout", "stop_signal", "depends_on",
    "wake_on",
)  # fmt: skip
STOP_METHODS: tuple[StopMethod, ...] = ("stop", "pause", "kill")
WAKE_ONS: tuple[WakeOn, ...] = ("connect", "data")
COMPOSE_DEPENDS_ON = "com.docker.compose.depends_on"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_sleep(
    labels: Mapping[str, str], *, prefix: str, container_id: str, name: str, running: bool
) -> tuple[Sleep | None, tuple[Problem, ...]]:
    """The container's `Sleep` (None: it does not sleep) and the problems of its labels.

    `prefix` ends with its dot (`proxy.`); `running`: the container runs now (else it is
    asleep)."""
    problems: list[Problem] = []
    values: dict[str, object] = {}
    for label in SLEEP_LABELS:
        key = prefix + label
        if key not in labels:
            continue
        text = labels[key]
        try:
            values[label] = _parse(label, text)
        except ValueError as exc:
            message = f"{exc}; the container's routes are served without sleep"
            problems.append(Problem("label", "", name, key, text, message))
    if problems or "idle_timeout" not in values:
        return None, tuple(problems)
    depends = values.get("depends_on")
    if depends is None:
        depends = compose_depends_on(labels.get(COMPOSE_DEPENDS_ON, ""))
    sleep = Sleep(
        container_id=container_id,
        container_name=name,
        idle_timeout=cast(float, values["idle_timeout"]),
        wake_timeout=cast(float, values.get("wake_timeout", 180.0)),
        stop_method=cast(StopMethod, values.get("stop_method", "stop")),
        stop_timeout=cast(float, values.get("stop_timeout", 60.0)),
        stop_signal=cast(str, values.get("stop_signal", "")),
        depends_on=cast(tuple[str, ...], depends),
        wake_on=cast(WakeOn, values.get("wake_on", "connect")),
        asleep=not running,
    )
    return sleep, ()


def _parse(label: str, text: str) -> object:
    value = text.strip()
    if label in ("idle_timeout", "wake_timeout", "stop_timeout"):
        return parse_positive_duration(value)
    if label == "stop_method":
        return _choice(value, STOP_METHODS)
    if label == "wake_on":
        return _choice(value, WAKE_ONS)
    if label == "stop_signal":
        return parse_signal(value)
    return parse_names(value)


def _choice(value: str, choices: tuple[str, ...]) -> str:
    lowered = value.lower()
    if lowered not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}")
    return lowered


def parse_signal(text: str) -> str:
    """`SIGTERM`, `term`, `15` -> the signal's name as Docker takes it (`SIGTERM`)."""
    value = text.strip().upper()
    if value.isdigit():
        try:
            return signal.Signals(int(value)).name
        except ValueError:
            raise ValueError("expected a signal name such as SIGTERM or its number") from None
    name = value if value.startswith("SIG") else "SIG" + value
    if name not in signal.Signals.__members__:
        raise ValueError("expected a signal name such as SIGTERM, SIGINT or SIGKILL")
    return name


def parse_names(text: str) -> tuple[str, ...]:
    """A comma list of container or compose service names (at least one, no duplicates)."""
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in names):
        raise ValueError("expected a comma list of container or compose service names")
    bad = next((n for n in names if not _NAME.fullmatch(n)), None)
    if bad is not None:
        raise ValueError(f"{bad!r} is not a container or service name")
    if len(set(names)) != len(names):
        raise ValueError("a name is listed twice")
    return tuple(names)


def compose_depends_on(text: str) -> tuple[str, ...]:
    """The service names of compose's `com.docker.compose.depends_on` label
    (`db:service_started:false,cache:service_healthy:true`), in its order."""
    names: list[str] = []
    for part in text.split(","):
        service = part.strip().split(":", 1)[0].strip()
        if service and _NAME.fullmatch(service) and service not in names:
            names.append(service)
    return tuple(names)
