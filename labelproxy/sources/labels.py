"""Container labels -> route specs (pure: no I/O, no docker import).

`parse_container` reads one `ContainerView`'s labels under the prefix (default `proxy`):
container-level `aliases`, `exclude`, `network`; per alias `<alias>.<field>`, `#N.<field>`
(N-th entry of `aliases`, from 1) and `*.<field>` (every alias). Precedence for one field:
`<alias>` over `#N` over `*`. Each port of a range becomes its own `RouteSpec`, resolved to one
`Backend` of this container (see `resolve`). The field syntax itself lives in `fields`, shared
with the routes file.

Errors are contained: a problem in a field kills only that alias (a bad `allow` must never turn
into "allow all"), other aliases and containers are untouched. An alias must be a bounded
route name (`fields.ALIAS_SYNTAX`: it becomes a metric label value and a log field); one that
is not is a problem without a route name of its own. An unreadable `exclude` skips the
container (it asked for something about exclusion we cannot honour) with a problem.

GoDoxy compatibility: `aliases`, `<alias>.port|scheme|bind|host` mean the same as in GoDoxy.
GoDoxy's HTTP-only fields (`middlewares`, `homepage`, `load_balance.*` ..., including any
dotted sub-field of them; `healthcheck*` are ours: `health.config`) and its container-level
idle-watcher labels are ignored silently (logged at DEBUG); an alias whose `scheme` is an
HTTP one (`http`, `https`, `h2c`, `fileserver`) is GoDoxy's business and is skipped the same
way. Any other unknown field is a problem naming the valid ones.

About 320 lines: the grouping of one container's labels by alias, with the precedence and
GoDoxy rules above, reads best in one place; the field syntax (`fields`) and the target
(`resolve`) are modules of their own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from labelproxy.health.config import owns_field
from labelproxy.sources.containers import ContainerView, DiscoveryContext
from labelproxy.sources.fields import (
    FIELDS,
    HTTP_SCHEMES,
    PortMap,
    RouteFields,
    alias_problem,
    parse_bool,
    parse_ports,
    parse_route_fields,
    route_options,
    scheme_problem,
)
from labelproxy.sources.resolve import AddressError, resolve_target
from labelproxy.sources.sleeplabels import SLEEP_LABELS, parse_sleep
from labelproxy.spec import (
    Backend,
    ListenKey,
    Problem,
    RouteOptions,
    RouteSpec,
    Scheme,
    Sleep,
    default_bind,
)
from labelproxy.spec import transport_of as transport_of_scheme

logger = logging.getLogger(__name__)

__all__ = [
    "Declared", "LabelFacts", "declare_container", "label_facts", "parse_container",
    "parse_route_fields",
]  # fmt: skip

CONTAINER_LABELS = ("aliases", "exclude", "network", *SLEEP_LABELS)
# GoDoxy labels that make no sense for an L4 proxy: ignored, with their dotted sub-fields.
GODOXY_ROUTE_FIELDS = frozenset(
    {
        "middlewares", "homepage", "load_balance", "access_log", "rules",
        "path_patterns", "no_tls_verify", "response_header_timeout", "disable_compression",
        "ssl_server_name", "ssl_trusted_certificate", "ssl_certificate", "ssl_certificate_key",
        "ssl_protocols", "root", "spa", "index", "agent", "idlewatcher", "wake_timeout",
        "stop_method", "stop_timeout", "stop_signal", "start_endpoint", "depends_on",
        "no_loading_page",
    }
)  # fmt: skip
GODOXY_CONTAINER_LABELS = frozenset({"start_endpoint", "no_loading_page"})

Sourced = dict[str, tuple[str, str]]  # field -> (full label key, value)


@dataclass(frozen=True, slots=True)
class Declared:
    """One route a container declares, with the label that declared its port (for problems)."""

    spec: RouteSpec
    label: str
    value: str


def parse_container(
    view: ContainerView, ctx: DiscoveryContext
) -> tuple[tuple[RouteSpec, ...], tuple[Problem, ...]]:
    """Every route `view`'s labels declare (one resolved `Backend` each) and every problem."""
    declared, problems = declare_container(view, ctx)
    return tuple(d.spec for d in declared), problems


def declare_container(
    view: ContainerView, ctx: DiscoveryContext
) -> tuple[tuple[Declared, ...], tuple[Problem, ...]]:
    """Like `parse_container`, keeping each route's port label for conflict reports."""
    prefix = ctx.label_prefix + "."
    ours = _ours(view.labels, prefix)
    if not ours:
        return (), ()
    problems: list[Problem] = []
    if "exclude" in ours:
        key, value = ours["exclude"]
        try:
            if parse_bool(value):
                return (), ()
        except ValueError as exc:
            message = f"{exc}; the container is skipped"
            return (), (Problem("label", "", view.name, key, value, message),)
    sleep, sleep_problems = parse_sleep(
        view.labels, prefix=prefix, container_id=view.id, name=view.name, running=view.running
    )
    if not view.running and sleep is None:  # only a sleep-enabled container routes asleep
        return (), ()
    problems.extend(sleep_problems)
    network = ours["network"][1].strip() if "network" in ours else None
    network_label = ours["network"][0] if "network" in ours else prefix + "network"
    grouped = _group(ours, prefix=prefix, name=view.name)
    problems.extend(grouped.problems)
    declared: list[Declared] = []
    for alias in sorted(grouped.specific):
        merged = grouped.merged(alias)
        if merged.get("scheme", ("", ""))[1].strip().lower() in HTTP_SCHEMES:
            logger.debug("skipping HTTP route %s of %s (not an L4 route)", alias, view.name)
            continue
        bad_alias = alias_problem(alias)
        if bad_alias is not None:  # no route label of its own: the alias is not one
            own = grouped.specific[alias]
            key = min(own.values())[0] if own else prefix + "aliases"
            problems.append(Problem("label", "", view.name, key, alias, bad_alias))
            continue
        route, route_problems = parse_route_fields(
            alias,
            {field: value for field, (_, value) in merged.items()},
            source=view.name,
            label_of=_label_lookup(merged, prefix=prefix, alias=alias),
        )
        problems.extend(route_problems)
        if route is not None:
            specs, found = _alias_specs(
                view, ctx, route, network=network, network_label=network_label, labels=merged
            )
            declared.extend(specs if sleep is None else [_with_sleep(d, sleep) for d in specs])
            problems.extend(found)
    return tuple(declared), tuple(problems)


@dataclass(frozen=True, slots=True)
class LabelFacts:
    """What a container's labels need from Docker beyond its labels (for discovery, which
    builds views from the container list and inspects a container only when these say so).

    `listen_ports`: every port one of its aliases would listen on (a superset: it ignores
    transport, bind and whether the route resolves). `scheme_from_ports`: some alias has no
    `scheme` label, so its scheme defaults from the container's exposed/published ports."""

    listen_ports: frozenset[int] = frozenset()
    scheme_from_ports: bool = False


def label_facts(labels: Mapping[str, str], *, label_prefix: str, name: str = "") -> LabelFacts:
    """The `LabelFacts` of a container's labels (pure; empty when it declares no route)."""
    prefix = label_prefix + "."
    ours = _ours(labels, prefix)
    if not ours:
        return LabelFacts()
    if "exclude" in ours:
        try:
            if parse_bool(ours["exclude"][1]):
                return LabelFacts()
        except ValueError:
            return LabelFacts()  # skipped as unreadable
    grouped = _group(ours, prefix=prefix, name=name)
    listen: set[int] = set()
    scheme_from_ports = False
    for alias in grouped.specific:
        merged = grouped.merged(alias)
        if "scheme" not in merged:
            scheme_from_ports = True
        elif merged["scheme"][1].strip().lower() in HTTP_SCHEMES:
            continue
        try:
            listen.update(pm.listen for pm in parse_ports(merged.get("port", ("", ""))[1]))
        except ValueError:
            continue  # the alias fails to parse: it claims nothing
    return LabelFacts(frozenset(listen), scheme_from_ports)


@dataclass(slots=True)
class _Grouped:
    """A container's labels under the prefix, sorted into aliases (see the module doc)."""

    specific: dict[str, Sourced]
    numbered: dict[str, Sourced]
    wildcard: Sourced
    problems: list[Problem]

    def merged(self, alias: str) -> Sourced:
        """An alias's fields: its own over `#N` over `*`."""
        return {**self.wildcard, **self.numbered.get(alias, {}), **self.specific[alias]}


def _ours(labels: Mapping[str, str], prefix: str) -> dict[str, tuple[str, str]]:
    """Labels under `prefix` (with its dot): rest of the key -> (full key, value)."""
    return {k[len(prefix) :]: (k, v) for k, v in labels.items() if k.startswith(prefix)}


def _group(ours: Mapping[str, tuple[str, str]], *, prefix: str, name: str) -> _Grouped:
    """Sort the route labels into aliases; unplaceable labels become problems."""
    grouped = _Grouped({}, {}, {}, [])
    specific, numbered, wildcard = grouped.specific, grouped.numbered, grouped.wildcard

    def problem(route: str, key: str, value: str, message: str) -> None:
        grouped.problems.append(Problem("label", route, name, key, value, message))

    listed: list[str] = []
    if "aliases" in ours:
        listed = [a.strip() for a in ours["aliases"][1].split(",") if a.strip()]
    specific.update({alias: {} for alias in listed})
    by_length = sorted(set(listed), key=len, reverse=True)
    for rest, (key, value) in sorted(ours.items()):
        if rest in CONTAINER_LABELS:
            continue
        if rest.startswith("*."):
            alias, field, target = "*", rest[2:], wildcard
        elif rest.startswith("#"):
            number, _, field = rest[1:].partition(".")
            if not (number.isascii() and number.isdigit()) or not 1 <= int(number) <= len(listed):
                problem(
                    f"#{number}", key, value,
                    f"#{number} must count an entry of {prefix}aliases from 1 "
                    f"(it lists {len(listed)}: {', '.join(listed) or 'none'})",
                )  # fmt: skip
                continue
            alias = listed[int(number) - 1]
            target = numbered.setdefault(alias, {})
        else:
            alias = next((a for a in by_length if rest.startswith(a + ".")), "")
            if alias:
                field = rest[len(alias) + 1 :]
            elif "." in rest:
                alias, _, field = rest.partition(".")
            elif rest in GODOXY_CONTAINER_LABELS:
                logger.debug("ignoring GoDoxy label %s on %s", key, name)
                continue
            else:
                problem(
                    "", key, value,
                    f"unknown label; expected {prefix}<alias>.<field> or one of "
                    + ", ".join(prefix + label for label in CONTAINER_LABELS),
                )  # fmt: skip
                continue
            if not alias:
                problem("", key, value, "expected an alias name before the field")
                continue
            target = specific.setdefault(alias, {})
        if (
            field not in FIELDS
            and not owns_field(field)
            and field.partition(".")[0] in GODOXY_ROUTE_FIELDS
        ):
            logger.debug("ignoring GoDoxy HTTP label %s on %s", key, name)
            continue
        target[field] = (key, value)

    if wildcard and not specific:
        for key, value in sorted(wildcard.values()):
            problem("*", key, value, f"applies to every alias, but {prefix}aliases lists none")
    return grouped


def _alias_specs(
    view: ContainerView,
    ctx: DiscoveryContext,
    route: RouteFields,
    *,
    network: str | None,
    network_label: str,
    labels: Sourced,
) -> tuple[list[Declared], list[Problem]]:
    """The specs of one well-formed alias: scheme default, target resolution per port."""
    port_key, port_value = labels["port"]
    planned: list[tuple[PortMap, Scheme]] = []
    for pm in route.ports:
        scheme = route.scheme or _default_scheme(view, pm.target)
        bad = scheme_problem(route, scheme)
        if bad is not None:
            field, message = bad
            key, value = labels[field]
            return [], [Problem("label", route.alias, view.name, key, value, message)]
        planned.append((pm, scheme))
    declared: list[Declared] = []
    failed: dict[tuple[str, str, str], list[int]] = {}
    options_of: dict[str, RouteOptions] = {}
    for pm, scheme in planned:
        transport = transport_of_scheme(scheme)
        if transport not in options_of:
            found, bad_check = route_options(
                route, transport, docker_health=view.health != "none", source=view.name,
                label_of=lambda name: labels[name][0] if name in labels else name,
            )  # fmt: skip
            if found is None:
                assert bad_check is not None
                return [], [bad_check]
            options_of[transport] = found
        try:
            target = resolve_target(
                view, ctx, target_port=pm.target, transport=transport,
                host=route.host, network=network,
            )  # fmt: skip
        except AddressError as exc:
            if exc.field == "network":
                where = (network_label, network or "")
            else:
                where = (port_key, port_value)
            failed.setdefault((*where, exc.message), []).append(pm.target)
            continue
        backend = Backend(target.host, target.port, view.id, view.name)
        listen = ListenKey(transport, route.bind or default_bind(scheme), pm.listen,
                           route.hostnames)
        options = options_of[transport]
        spec = RouteSpec(route.alias, scheme, listen, (backend,), options, source=view.name)
        declared.append(Declared(spec, port_key, port_value))
    problems = [
        Problem("address", route.alias, view.name, key, value, f"{message} ({_summary(ports)})")
        for (key, value, message), ports in failed.items()
    ]  # fmt: skip
    return declared, problems


def _with_sleep(declared: Declared, sleep: Sleep) -> Declared:
    """`declared` with the container's wake-on-demand settings in its options."""
    spec = declared.spec
    options = dataclasses.replace(spec.options, sleep=sleep)
    return dataclasses.replace(declared, spec=dataclasses.replace(spec, options=options))


def _default_scheme(view: ContainerView, target_port: int) -> Scheme:
    """`udp` when the container exposes/publishes `target_port` only as udp, else `tcp`."""
    return "udp" if view.protocols_of(target_port) == {"udp"} else "tcp"


def _summary(ports: list[int]) -> str:
    if len(ports) == 1:
        return f"target port {ports[0]}"
    return f"target ports {ports[0]}-{ports[-1]}, {len(ports)} ports"


def _label_lookup(merged: Sourced, *, prefix: str, alias: str) -> Callable[[str], str]:
    """field -> the full label key that supplied it (or would have, for a missing field)."""

    def label_of(field: str) -> str:
        return merged[field][0] if field in merged else f"{prefix}{alias}.{field}"

    return label_of
