"""Read a compose file the way the Compose that would deploy it does, for `labelproxy check`.

Three readers, the first that is installed wins (`read_compose`):

1. the Docker CLI plugin, Compose v2: `docker compose -f FILE config --format json`, when
   `docker compose version` answers (Debian's `docker.io` and a bare Docker 28 have no plugin:
   `docker compose -f` then fails with `unknown shorthand flag: 'f' in -f`);
2. a standalone `docker-compose`: v2 (`config --format json`) or Debian's v1 (`config`, YAML);
3. the YAML itself, read by labelproxy: YAML 1.2 core schema as Compose v2 reads it (unquoted
   `2224:22` is the string `2224:22`, not the YAML 1.1 base-60 number 133462; `yes`/`on` are
   strings), `<<:` merge keys and anchors (`x-` extension fields), `${VAR}` / `${VAR:-default}`
   / `$$` interpolation from the environment over the file's `.env`, services of inactive
   `profiles` left out. `extends` and `include` are not followed (a note says so).

A Compose CLI that rejects the file raises `ComposeError` with its message: that is the lint
result. `ComposeModel.detail` says in one line which reader was used and why the ones before it
were not; `notes` are things about the reading the user should see (printed as warnings).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

CONFIG_TIMEOUT = 30.0
PLUGIN = "docker compose config"
STANDALONE = "docker-compose config"
YAML = "yaml"

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^{}]*(?:\{[^{}]*\}[^{}]*)*)\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)
_BASE60 = re.compile(r"[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+")  # YAML 1.1 sexagesimal int


class ComposeError(Exception):
    """The compose file cannot be read; the message says why."""


@dataclass(frozen=True, slots=True)
class ComposeModel:
    """A compose model as one of the readers produced it."""

    config: Mapping[str, Any]
    reader: str  # PLUGIN, STANDALONE or YAML
    detail: str  # one line: the reader, its version, why the ones before it were not used
    notes: tuple[str, ...] = ()


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core schema scalars (as Compose v2's go-yaml).

    Only `true`/`false` are booleans, ints are decimal, `0o` and `0x`, floats have no `:`;
    null and the `<<` merge key are kept. Everything else plain is a string."""


ComposeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag.endswith((":null", ":merge"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _rx, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
):  # fmt: skip
    ComposeLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_rx), list(_first))


def load_yaml(text: str) -> Any:
    """Parse `text` as Compose v2 does (see `ComposeLoader`)."""
    return yaml.load(text, Loader=ComposeLoader)  # a SafeLoader subclass: safe


def read_compose(path: Path, *, use_cli: bool = True) -> ComposeModel:
    """The model of `path` from the first reader available (see the module docstring)."""
    why_not: list[str] = []
    if use_cli:
        model = _from_plugin(path, why_not)
        if model is None:
            model = _from_standalone(path, why_not)
        if model is not None:
            return model
    else:
        why_not.append("Compose CLI not used")
    return _from_yaml(path, why_not)


def _version(cmd: list[str]) -> str | None:
    """`cmd version --short` ("2.40.3", "1.29.2"), or None when that does not answer."""
    try:
        done = subprocess.run(
            [*cmd, "version", "--short"], capture_output=True, text=True,
            timeout=CONFIG_TIMEOUT, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("%s version: %s", " ".join(cmd), exc)
        return None
    version = done.stdout.strip().removeprefix("v")
    return version if done.returncode == 0 and version[:1].isdigit() else None


def _from_plugin(path: Path, why_not: list[str]) -> ComposeModel | None:
    if shutil.which("docker") is None:
        why_not.append("no docker on PATH")
        return None
    version = _version(["docker", "compose"])
    if version is None:
        why_not.append("docker has no compose plugin")
        return None
    cmd = ["docker", "compose", "-f", str(path.resolve()), "config", "--format", "json"]
    config = _parsed(_config(PLUGIN, cmd, path), PLUGIN, is_json=True)
    return ComposeModel(config, PLUGIN, f"{PLUGIN} (Compose {version})")


def _from_standalone(path: Path, why_not: list[str]) -> ComposeModel | None:
    if shutil.which("docker-compose") is None:
        why_not.append("no docker-compose on PATH")
        return None
    version = _version(["docker-compose"])
    if version is None:
        why_not.append("docker-compose does not answer `version`")
        return None
    detail = f"{STANDALONE} (docker-compose {version}; {', '.join(why_not)})"
    if not version.startswith("1."):
        cmd = ["docker-compose", "-f", str(path.resolve()), "config", "--format", "json"]
        config = _parsed(_config(STANDALONE, cmd, path), STANDALONE, is_json=True)
        return ComposeModel(config, STANDALONE, detail)
    out = _config(STANDALONE, ["docker-compose", "-f", str(path.resolve()), "config"], path)
    notes = _base60_notes(path.read_text(errors="replace"))
    return ComposeModel(_parsed(out, STANDALONE, is_json=False), STANDALONE, detail, notes)


def _config(reader: str, cmd: list[str], path: Path) -> str:
    """The stdout of a `config` command; its refusal is the lint result (`ComposeError`)."""
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CONFIG_TIMEOUT, check=False,
            cwd=path.resolve().parent, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ComposeError(f"{reader} could not read {path}: {exc}") from None
    if done.returncode != 0:
        said = "; ".join(ln.strip() for ln in done.stderr.splitlines() if ln.strip())
        raise ComposeError(f"{reader} rejected {path}: {said or f'exit {done.returncode}'}")
    return done.stdout


def _parsed(out: str, reader: str, *, is_json: bool) -> Mapping[str, Any]:
    """The model a `config` command printed (JSON from v2, YAML from v1)."""
    try:
        config = json.loads(out) if is_json else load_yaml(out)
    except (ValueError, yaml.YAMLError) as exc:
        raise ComposeError(f"{reader} printed an unreadable model: {exc}") from None
    if not isinstance(config, dict):
        raise ComposeError(f"{reader} printed no compose model (expected a mapping)")
    return config


def _from_yaml(path: Path, why_not: list[str]) -> ComposeModel:
    try:
        text = path.read_text()
        raw = load_yaml(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        one_line = " ".join(str(exc).split())
        raise ComposeError(f"{path}: not a readable YAML file: {one_line}") from None
    if not isinstance(raw, dict):
        raise ComposeError(f"{path}: expected a mapping with `services`")
    env = {**dotenv(path.resolve().parent / ".env"), **os.environ}
    config: dict[str, Any] = interpolate(raw, env, where=str(path))
    if os.environ.get("COMPOSE_PROJECT_NAME"):
        config["name"] = os.environ["COMPOSE_PROJECT_NAME"]
    notes: list[str] = []
    services = config.get("services")
    if isinstance(services, dict):
        active = {p.strip() for p in os.environ.get("COMPOSE_PROFILES", "").split(",")}
        config["services"] = {
            name: svc for name, svc in services.items()
            if not (isinstance(svc, dict) and svc.get("profiles"))
            or "*" in active or active & {str(p) for p in svc["profiles"]}
        }  # fmt: skip
        notes += [
            f"service {name}: `extends` is not followed when reading the YAML directly; "
            "install Compose v2 (docker compose) for an exact reading"
            for name, svc in config["services"].items()
            if isinstance(svc, dict) and "extends" in svc
        ]
    if "include" in config:
        notes.append("`include` is not followed when reading the YAML directly")
    detail = (
        f"labelproxy as YAML ({', '.join(why_not)}): YAML 1.2 as in Compose v2, ${{VAR}} from "
        "the environment and .env, no extends or include"
    )
    return ComposeModel(config, YAML, detail, tuple(notes))


def dotenv(path: Path) -> dict[str, str]:
    """`KEY=VALUE` lines of a Compose `.env` file (comments, `export`, quotes); {} if absent."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    env: dict[str, str] = {}
    for line in lines:
        line = line.strip().removeprefix("export ").strip()  # noqa: PLW2901
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        env[key.strip()] = value
    return env


def interpolate(value: Any, env: Mapping[str, str], *, where: str) -> Any:
    """Compose's variable substitution in every string value (keys are left alone)."""
    if isinstance(value, str):
        return _substitute(value, env, where)
    if isinstance(value, dict):
        return {k: interpolate(v, env, where=where) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, where=where) for v in value]
    return value


def _substitute(text: str, env: Mapping[str, str], where: str) -> str:
    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        braced = _BRACED.fullmatch(match["braced"])
        if braced is None:
            raise ComposeError(f"{where}: invalid interpolation {match[0]!r} in {text!r}")
        name, op, arg = braced["name"], braced["op"] or "", braced["arg"] or ""
        value = env.get(name)
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return _substitute(arg, env, where) if unset else str(value)
        if op.endswith("?"):
            if unset:
                raise ComposeError(f"{where}: required variable {name} is missing: {arg}")
            return str(value)
        if op.endswith("+"):
            return "" if unset else _substitute(arg, env, where)
        return value or ""

    return _VAR.sub(one, text)


def _base60_notes(text: str) -> tuple[str, ...]:
    """Unquoted `2224:22`-like values, which Compose v1 (YAML 1.1) reads as base-60 numbers."""
    try:
        root = yaml.compose(text, Loader=ComposeLoader)
    except yaml.YAMLError:
        return ()
    notes: list[tuple[int, str]] = []
    seen: set[int] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            if node.style is None and _BASE60.fullmatch(node.value):
                number = 0
                for part in node.value.lstrip("+-").replace("_", "").split(":"):
                    number = number * 60 + int(part)
                line = node.start_mark.line + 1
                notes.append((line, (
                    f"line {line}: docker-compose v1 (YAML 1.1) reads unquoted "
                    f"{node.value} as the base-60 number {number}, Compose v2 as the string "
                    f"'{node.value}'; quote it"
                )))  # fmt: skip
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
    return tuple(note for _, note in sorted(notes))
