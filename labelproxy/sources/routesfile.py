"""The static routes file: YAML `routes: {name: {field: value}}` -> route specs.

Fields and validation are those of the labels (see `fields`), with `host` required (there is no
container to resolve) and allowed to be a pool: `host: [10.0.0.5, "10.0.0.6:2022"]`, a comma
list, or the same under `hosts:`. An entry without a port uses the route's target port;
`HOST:PORT` entries need a single-port route. The scheme defaults to `tcp`.

The YAML is read with PyYAML's `BaseLoader`: every scalar stays a string, exactly like a label,
so `port: 2222:22` is not YAML 1.1's base-60 integer 133342 and `max_connections: 100` goes
through the same parser as the label. A file that cannot be read or is not a mapping with
`routes:` raises `RoutesFileError` (the caller keeps its previous routes); a bad route is a
`Problem` naming the file and `routes.<name>.<field>` and affects only that route. A route
name follows the rules of an alias (`fields.ALIAS_SYNTAX`).

On a reload, `keep_last_good` keeps serving the last good version of a route (by name) that
an edit broke, with its problem saying so; a route removed from the file is removed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from labelproxy.sources.fields import (
    alias_problem,
    parse_host_port,
    parse_route_fields,
    route_options,
)
from labelproxy.spec import (
    Backend,
    ListenKey,
    Problem,
    RouteSpec,
    default_bind,
    transport_of,
)

logger = logging.getLogger(__name__)

_LIST_FIELDS = frozenset({"allow", "deny", "hostnames"})
_HOST_FIELDS = ("host", "hosts")

# problem(field, value, message) -> a label Problem of the route being parsed
_ProblemMaker = Callable[[str, object, str], Problem]


class RoutesFileError(Exception):
    """The routes file as a whole is unusable; the message names the path."""


def load_routes_file(path: Path) -> tuple[tuple[RouteSpec, ...], tuple[Problem, ...]]:
    """The routes declared in `path` and the problems of the bad ones."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RoutesFileError(f"cannot read routes file {path}: {reason}") from None
    return parse_routes(text, source=str(path))


# strings, lists and dicts only (no implicit typing); libyaml's when PyYAML has it (a
# thousand routes parse in milliseconds instead of a tenth of a second)
_LOADER: type[yaml.BaseLoader] = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


def parse_routes(text: str, *, source: str) -> tuple[tuple[RouteSpec, ...], tuple[Problem, ...]]:
    """Like `load_routes_file`, for YAML text read from `source`."""
    try:
        document = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise RoutesFileError(f"routes file {source} is not valid YAML: {exc}") from None
    if not isinstance(document, dict) or "routes" not in document:
        raise RoutesFileError(f"routes file {source}: expected a YAML mapping with a routes: key")
    routes = document["routes"]
    if routes == "":
        routes = {}
    if not isinstance(routes, dict):
        raise RoutesFileError(
            f"routes file {source}: expected routes: to be a mapping of route name -> fields"
        )
    specs: list[RouteSpec] = []
    problems: list[Problem] = [
        Problem("label", "", source, str(key), _text(value), "unknown key; expected routes:")
        for key, value in document.items()
        if key != "routes"
    ]
    for name in sorted(routes):
        found_specs, found = _parse_route(str(name), routes[name], source=source)
        specs.extend(found_specs)
        problems.extend(found)
    return tuple(specs), tuple(problems)


KEPT_NOTE = "still serving its last good version"


@dataclass(frozen=True, slots=True)
class StaticRoutes:
    """The static routes to serve after a load: by route name, the specs of every good route
    and the last good version of a broken one (`kept`), and the problems of this load."""

    by_name: Mapping[str, tuple[RouteSpec, ...]]
    problems: tuple[Problem, ...] = ()
    kept: tuple[str, ...] = ()
    specs: tuple[RouteSpec, ...] = ()  # every spec of `by_name`, in name order


def keep_last_good(
    previous: Mapping[str, tuple[RouteSpec, ...]],
    specs: Iterable[RouteSpec],
    problems: Iterable[Problem],
) -> StaticRoutes:
    """Merge a fresh parse with the previous load: a route that is in the file but broken
    (it has problems and no specs) keeps its previous specs, and its problems say so; a route
    no longer in the file is gone."""
    by_name: dict[str, list[RouteSpec]] = {}
    for spec in specs:
        by_name.setdefault(spec.alias, []).append(spec)
    problems = tuple(problems)
    broken = {p.route for p in problems if p.route and p.route not in by_name}
    kept = tuple(sorted(name for name in broken if name in previous))
    noted = tuple(
        dataclasses.replace(p, message=f"{p.message}; {KEPT_NOTE}") if p.route in kept else p
        for p in problems
    )
    merged = {name: tuple(found) for name, found in by_name.items()}
    merged.update((name, previous[name]) for name in kept)
    flat = tuple(spec for name in sorted(merged) for spec in merged[name])
    return StaticRoutes(merged, noted, kept, flat)


def _parse_route(
    name: str, entry: object, *, source: str
) -> tuple[list[RouteSpec], list[Problem]]:
    def label_of(field: str) -> str:
        return f"routes.{name}.{field}"

    def problem(field: str, value: object, message: str) -> Problem:
        return Problem("label", name, source, label_of(field), _text(value), message)

    if not name:
        return [], [Problem("label", "", source, "routes", "", "expected a non-empty route name")]
    bad_name = alias_problem(name)
    if bad_name is not None:
        return [], [Problem("label", "", source, "routes", name, bad_name)]
    if not isinstance(entry, dict):
        message = "expected a mapping of fields (port, host, scheme, ...)"
        return [], [Problem("label", name, source, f"routes.{name}", _text(entry), message)]
    problems: list[Problem] = []
    fields: dict[str, str] = {}
    for key, value in entry.items():
        field = str(key)
        if field in _HOST_FIELDS:
            continue
        if isinstance(value, str):
            fields[field] = value
        elif field in _LIST_FIELDS and isinstance(value, list) and all(
            isinstance(v, str) for v in value
        ):
            fields[field] = ",".join(value)
        else:
            problems.append(problem(field, value, "expected a single value, not a list or mapping"))
    pool, found = _parse_pool(entry, problem=problem)
    problems.extend(found)
    route, found_fields = parse_route_fields(name, fields, source=source, label_of=label_of)
    problems.extend(found_fields)
    if route is None or problems or not pool:
        return [], problems
    if len(route.ports) > 1 and any(port is not None for _, port in pool):
        field = "hosts" if "hosts" in entry else "host"
        message = "expected hosts without :PORT on a port range (each listen port maps 1:1)"
        return [], [problem(field, entry[field], message)]
    scheme = route.scheme or "tcp"
    options, bad_check = route_options(
        route, transport_of(scheme), docker_health=False, source=source, label_of=label_of
    )
    if options is None:
        assert bad_check is not None
        return [], [bad_check]
    specs = [
        RouteSpec(
            alias=name,
            scheme=scheme,
            key=ListenKey(transport_of(scheme), route.bind or default_bind(scheme), pm.listen,
                          route.hostnames),
            backends=tuple(sorted({Backend(host, port or pm.target) for host, port in pool})),
            options=options,
            source=source,
        )
        for pm in route.ports
    ]
    return specs, []


def _parse_pool(
    entry: dict[object, object], *, problem: _ProblemMaker
) -> tuple[list[tuple[str, int | None]], list[Problem]]:
    """The static backends under `host`/`hosts`: one entry, a comma list or a YAML list."""
    given = [field for field in _HOST_FIELDS if field in entry]
    if not given:
        message = "host is required in a routes file: expected HOST, HOST:PORT or a list of them"
        return [], [problem("host", "", message)]
    if len(given) > 1:
        return [], [problem("hosts", entry["hosts"], "expected host or hosts, not both")]
    field = given[0]
    value = entry[field]
    if isinstance(value, str):
        items: list[object] = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        items = [value]
    if not items:
        return [], [problem(field, value, "expected HOST, HOST:PORT or a list of them")]
    pool: list[tuple[str, int | None]] = []
    problems: list[Problem] = []
    for item in items:
        if not isinstance(item, str):
            problems.append(problem(field, item, "expected HOST or HOST:PORT"))
            continue
        try:
            pool.append(parse_host_port(item))
        except ValueError as exc:
            problems.append(problem(field, item.strip(), str(exc)))
    return pool, problems


def _text(value: object) -> str:
    """A YAML value as the text a problem shows."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
