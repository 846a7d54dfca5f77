"""The host-networking guard around the test suite: nothing the host had may be gone or changed.

`tests/run` records the host's networking before pytest (`snapshot`) and compares after it
(`compare`); any link, bridge, address, route, nftables object, iptables rule or forwarding
sysctl that existed before and is gone or different after fails the run, naming it. New things
left behind are warnings, and so is a network namespace that is gone: namespaces belong to
whoever made them (the suite deletes only its own, by name), and on a shared machine another
test run's come and go. What is compared (counters, carrier state, lifetimes
and temporary IPv6 addresses are not: they change on their own):

- links: kind, master, admin state (UP flag), addresses (`ip -j -d addr`);
- routes of every table, IPv4 and IPv6 (`ip -j route show table all`), without flags;
- `nft -j list ruleset` without handles, counters, quotas' usage and dynamic set elements;
- `iptables-save` / `ip6tables-save` rules and chain policies, without counters;
- `/run/netns` names and `ip_forward` / IPv6 `forwarding`.

Names matching the suite's run-unique prefix (`lpt<pid>-`, from any run) and bridges whose
addresses lie in the private engines' pool are test objects: a concurrent test run may delete its
own, so they are reported, never failures. A veth on a bridge is a container's cable: it goes
when that container stops, so it is a warning too. `LABELPROXY_HOSTGUARD_IGNORE` (a regex of
names) adds to that; `LABELPROXY_HOSTGUARD=warn` turns failures into warnings.

    python -m tests.support.hostguard snapshot [--netns NS] > before.json
    python -m tests.support.hostguard compare before.json [--after FILE] [--netns NS]
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.hostnet import ENGINE_POOL, ip_json

logger = logging.getLogger(__name__)

Snapshot = dict[str, Any]
SUITE_NAMES = re.compile(r"^lpt\d+-")
SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")
VOLATILE_KEYS = frozenset({"handle", "packets", "bytes", "used", "expires"})
CHAIN_COUNTERS = re.compile(r" \[\d+:\d+\]$")
ROUTE_KEYS = ("type", "dst", "gateway", "via", "dev", "protocol", "scope", "prefsrc", "metric")


def _run(cmd: list[str], netns: str | None) -> str | None:
    """stdout of `cmd` (inside `netns` when given), or None when the tool is missing/fails."""
    if shutil.which(cmd[0]) is None:
        return None
    full = ["ip", "netns", "exec", netns, *cmd] if netns else cmd
    done = subprocess.run(full, capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else None


def _links(netns: str | None) -> dict[str, dict[str, Any]]:
    links = {}
    for link in ip_json("-d", "addr", "show", netns=netns):
        addresses = sorted(
            f"{a['family']} {a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if "local" in a and not a.get("temporary") and not a.get("deprecated")
        )
        links[link["ifname"]] = {
            "kind": link.get("linkinfo", {}).get("info_kind", link.get("link_type", "")),
            "master": link.get("master"),
            "up": "UP" in link.get("flags", []),
            "addresses": addresses,
        }
    return links


def _routes(netns: str | None) -> list[dict[str, Any]]:
    routes = []
    for family in ("-4", "-6"):
        for route in ip_json(family, "route", "show", "table", "all", netns=netns):
            entry = {k: route[k] for k in ROUTE_KEYS if k in route}
            entry["table"] = route.get("table", "main")
            entry["volatile"] = "expires" in route
            routes.append(entry)
    return routes


def without_volatile(value: Any) -> Any:
    """An nft JSON value without what changes by itself (handles, counters, usage, expiry)."""
    if isinstance(value, dict):
        if "elem" in value and ("timeout" in value or "dynamic" in value.get("flags", [])):
            value = {k: v for k, v in value.items() if k != "elem"}
        return {k: without_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def _nft(netns: str | None) -> list[str] | None:
    out = _run(["nft", "-j", "list", "ruleset"], netns)
    if out is None:
        return None
    objects = json.loads(out).get("nftables", []) if out.strip() else []
    kept = (without_volatile(obj) for obj in objects if "metainfo" not in obj)
    return sorted(json.dumps(obj, sort_keys=True) for obj in kept)


def _iptables(netns: str | None) -> dict[str, list[str]]:
    found = {}
    for tool in ("iptables-save", "ip6tables-save"):
        out = _run([tool], netns)
        if out is None:
            continue
        table, rules = "", []
        for line in out.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith((":", "-")):
                rules.append(f"{table} {CHAIN_COUNTERS.sub('', line)}")
        found[tool] = sorted(rules)
    return found


def _sysctls(netns: str | None) -> dict[str, str]:
    found = {}
    for name in SYSCTLS:
        out = _run(["cat", f"/proc/sys/{name}"], netns)
        if out is not None:
            found[name] = out.strip()
    return found


def snapshot(*, netns: str | None = None) -> Snapshot:
    """The host's (or `netns`'s) networking as JSON-able data; see the module doc."""
    run_netns = Path("/run/netns")
    namespaces = sorted(os.listdir(run_netns)) if netns is None and run_netns.is_dir() else []
    return {
        "links": _links(netns),
        "routes": _routes(netns),
        "nft": _nft(netns),
        "iptables": _iptables(netns),
        "netns": namespaces,
        "sysctls": _sysctls(netns),
    }


@dataclass
class Report:
    """What changed: `problems` fail the run, `warnings` are printed."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _test_object(name: str, link: dict[str, Any] | None, ignore: re.Pattern[str]) -> bool:
    """A link (or namespace) of a test run: suite prefix, ignore pattern, or engine pool bridge."""
    if SUITE_NAMES.match(name) or (ignore.pattern and ignore.search(name)):
        return True
    if link is None or link["kind"] != "bridge" or not link["addresses"]:
        return False
    inet = [a.split()[1] for a in link["addresses"] if a.startswith("inet ")]
    return bool(inet) and all(ipaddress.IPv4Interface(a).network.subnet_of(ENGINE_POOL)
                              for a in inet)  # fmt: skip


def _describe(name: str, link: dict[str, Any]) -> str:
    extra = [link["kind"] or "link", *(["master " + link["master"]] if link["master"] else [])]
    return f"{name} ({', '.join(extra + link['addresses'])})"


def _compare_links(before: Snapshot, after: Snapshot, ignore: re.Pattern[str],
                   report: Report) -> set[str]:  # fmt: skip
    """Compare links; return the names of test and new links (their routes are not compared)."""
    old, new = before["links"], after["links"]
    test_links = {n for n, link in {**new, **old}.items() if _test_object(n, link, ignore)}
    test_links |= {n for n, link in {**new, **old}.items() if link["master"] in test_links}
    for name, link in old.items():
        if name in test_links:
            continue
        what = "bridge" if link["kind"] == "bridge" else "link"
        if name not in new:
            volatile = link["kind"] == "veth" and link["master"] is not None
            (report.warnings if volatile else report.problems).append(
                f"{what} {_describe(name, link)} is gone"
            )
        elif new[name] != link:
            changes = [f"{key} {link[key]!r} -> {new[name][key]!r}"
                       for key in link if link[key] != new[name].get(key)]  # fmt: skip
            report.problems.append(f"{what} {name} changed: {'; '.join(changes)}")
    for name in sorted(set(new) - set(old)):
        report.warnings.append(f"new link left behind: {_describe(name, new[name])}")
    return test_links | (set(new) - set(old))


def _route_text(route: dict[str, Any]) -> str:
    words = [f"{k} {route[k]}" for k in ROUTE_KEYS if k in route and k != "dst"]
    return f"route {route.get('dst', '?')} {' '.join(words)} table {route['table']}"


def _compare_multisets(kind: str, old: list[str], new: list[str], report: Report) -> None:
    gone = collections.Counter(old) - collections.Counter(new)
    added = collections.Counter(new) - collections.Counter(old)
    report.problems.extend(f"{kind} is gone: {item[:300]}" for item in sorted(gone))
    report.warnings.extend(f"new {kind} left behind: {item[:300]}" for item in sorted(added))


def compare(before: Snapshot, after: Snapshot, *, ignore: str = "") -> Report:
    """What of `before` is gone or changed in `after` (problems), and what is new (warnings)."""
    pattern = re.compile(ignore)
    report = Report()
    test_links = _compare_links(before, after, pattern, report)
    then = {_route_text(r) for r in before["routes"]}
    now = {_route_text(r) for r in after["routes"]}
    for route in before["routes"]:
        if route.get("dev") not in test_links and _route_text(route) not in now:
            (report.warnings if route["volatile"] else report.problems).append(
                f"{_route_text(route)} is gone"
            )
    for route in after["routes"]:
        if route.get("dev") not in test_links and _route_text(route) not in then:
            report.warnings.append(f"new {_route_text(route)} left behind")
    if before["nft"] is not None and after["nft"] is not None:
        _compare_multisets("nftables object", before["nft"], after["nft"], report)
    for tool, rules in before["iptables"].items():
        _compare_multisets(f"{tool} rule", rules, after["iptables"].get(tool, []), report)
    for name in before["netns"]:
        if name not in after["netns"] and not _test_object(name, None, pattern):
            report.warnings.append(f"network namespace {name} is gone")
    for name, value in before["sysctls"].items():
        if after["sysctls"].get(name, value) != value:
            report.problems.append(f"sysctl {name} changed: {value} -> {after['sysctls'][name]}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.hostguard")
    sub = parser.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot", help="print the host's networking as JSON")
    snap.add_argument("--netns", help="a network namespace instead of the host's")
    comp = sub.add_parser("compare", help="compare a snapshot with now (or with --after)")
    comp.add_argument("before", type=Path)
    comp.add_argument("--after", type=Path, help="a later snapshot instead of the state now")
    comp.add_argument("--netns", help="a network namespace instead of the host's")
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        json.dump(snapshot(netns=args.netns), sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    before = json.loads(args.before.read_text())
    after = json.loads(args.after.read_text()) if args.after else snapshot(netns=args.netns)
    report = compare(before, after, ignore=os.environ.get("LABELPROXY_HOSTGUARD_IGNORE", ""))
    for line in report.warnings:
        print(f"hostguard: warning: {line}", file=sys.stderr)
    warn_only = os.environ.get("LABELPROXY_HOSTGUARD") == "warn"
    for line in report.problems:
        print(f"hostguard: {'warning' if warn_only else 'FAILED'}: {line}", file=sys.stderr)
    if report.problems and not warn_only:
        print(f"hostguard: the test run changed this host's networking ({len(report.problems)} "
              "of the things above); see tests/support/hostguard.py", file=sys.stderr)  # fmt: skip
        return 1
    print(f"hostguard: host networking unchanged ({len(before['links'])} links, "
          f"{len(before['routes'])} routes, {len(before['nft'] or [])} nftables objects, "
          f"{sum(map(len, before['iptables'].values()))} iptables rules)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
