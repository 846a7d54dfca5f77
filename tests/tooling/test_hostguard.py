"""The host-networking guard of `tests/run` (tests/support/hostguard.py) catches what vanished.

A table of changes to a recorded snapshot says which ones fail the run and which are warnings;
a real round trip in a network namespace this test creates records a bridge named `docker0` there
(the link the old private engine deleted on the host) with an address, its route and an iptables
rule, deletes them, and expects the guard's command line to fail naming each. Host links are
never touched: everything happens inside the test's own namespace.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hostguard import Snapshot, compare, without_volatile
from tests.support.hostnet import Netns

ROOT = Path(__file__).resolve().parents[2]


def _link(kind: str, *addresses: str, master: str | None = None) -> dict[str, Any]:
    return {"kind": kind, "master": master, "up": True, "addresses": list(addresses)}


def _route(dst: str, dev: str, *, volatile: bool = False) -> dict[str, Any]:
    return {"dst": dst, "dev": dev, "protocol": "kernel", "table": "main", "volatile": volatile}


BASE: Snapshot = {
    "links": {
        "lo": _link("loopback", "inet 127.0.0.1/8"),
        "eth0": _link("ether", "inet 192.0.2.2/24", "inet6 fd00::2/64"),
        "docker0": _link("bridge", "inet 172.17.0.1/16"),
        "veth1a2b": _link("veth", master="docker0"),
        "lpt77-1": _link("bridge", "inet 198.51.100.1/26"),
        "br-0123456789ab": _link("bridge", "inet 10.213.4.1/24"),
    },
    "routes": [
        _route("192.0.2.0/24", "eth0"),
        _route("172.17.0.0/16", "docker0"),
        _route("10.213.4.0/24", "br-0123456789ab"),
        _route("2001:db8::/64", "eth0", volatile=True),
    ],
    "nft": ['{"table": {"family": "inet", "name": "firewall"}}'],
    "iptables": {
        "iptables-save": ["filter :INPUT ACCEPT", "filter -A INPUT -s 198.51.100.7/32 -j DROP"]
    },
    "netns": ["vpn", "lpt77-2"],
    "sysctls": {"net/ipv4/ip_forward": "1"},
}


def _drop_link(name: str) -> Callable[[Snapshot], None]:
    def change(snap: Snapshot) -> None:
        del snap["links"][name]
        snap["routes"] = [r for r in snap["routes"] if r["dev"] != name]

    return change


def _set(path: tuple[str, ...], value: Any) -> Callable[[Snapshot], None]:
    def change(snap: Snapshot) -> None:
        target = snap
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _remove(key: str, item: str, sub: str | None = None) -> Callable[[Snapshot], None]:
    def change(snap: Snapshot) -> None:
        (snap[key][sub] if sub else snap[key]).remove(item)

    return change


CASES: list[tuple[str, Callable[[Snapshot], None], list[str], list[str]]] = [
    ("nothing changed", lambda snap: None, [], []),
    ("the host's docker0 is gone", _drop_link("docker0"),
     ["bridge docker0 (bridge, inet 172.17.0.1/16) is gone", "route 172.17.0.0/16"], []),
    ("an address of eth0 changed", _set(("links", "eth0", "addresses"), ["inet 192.0.2.3/24"]),
     ["link eth0 changed: addresses"], []),
    ("eth0 was set down", _set(("links", "eth0", "up"), False), ["link eth0 changed: up"], []),
    ("a container's veth went with its container", _drop_link("veth1a2b"),
     [], ["link veth1a2b (veth, master docker0) is gone"]),
    ("a suite bridge of another run is gone", _drop_link("lpt77-1"), [], []),
    ("an engine-pool bridge of another run is gone", _drop_link("br-0123456789ab"), [], []),
    ("a new link was left behind", _set(("links", "lpt88-1"), _link("bridge")),
     [], ["new link left behind: lpt88-1"]),
    ("a route learned from a router advertisement expired",
     lambda snap: snap["routes"].pop(), [], ["route 2001:db8::/64"]),
    ("an nftables table is gone", _remove("nft", BASE["nft"][0]),
     ['nftables object is gone: {"table": {"family": "inet", "name": "firewall"}}'], []),
    ("an iptables rule is gone",
     _remove("iptables", "filter -A INPUT -s 198.51.100.7/32 -j DROP", "iptables-save"),
     ["iptables-save rule is gone: filter -A INPUT -s 198.51.100.7/32 -j DROP"], []),
    ("a network namespace is gone", _remove("netns", "vpn"), [], ["network namespace vpn is gone"]),
    ("a suite namespace is gone", _remove("netns", "lpt77-2"), [], []),
    ("ip_forward was turned off", _set(("sysctls", "net/ipv4/ip_forward"), "0"),
     ["sysctl net/ipv4/ip_forward changed: 1 -> 0"], []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "problems", "warnings"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_compare_fails_on_what_vanished_and_warns_on_what_is_volatile_or_new(
    change: Callable[[Snapshot], None], problems: list[str], warnings: list[str]
) -> None:
    after = copy.deepcopy(BASE)
    change(after)
    report = compare(BASE, after)
    for expected, found in ((problems, report.problems), (warnings, report.warnings)):
        for text in expected:
            assert any(text in line for line in found), (text, found)
        assert len(found) >= len(expected)
        if not expected:
            assert found == []


def test_an_ignore_pattern_excuses_a_named_link() -> None:
    after = copy.deepcopy(BASE)
    _drop_link("docker0")(after)
    assert compare(BASE, after, ignore="^docker0$").problems == []


def test_nft_counters_handles_and_dynamic_set_elements_do_not_count() -> None:
    def rule(packets: int, handle: int) -> dict[str, Any]:
        return {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": handle,
                         "expr": [{"counter": {"packets": packets, "bytes": packets * 60}},
                                  {"accept": None}]}}  # fmt: skip

    def dynamic_set(*elem: str) -> dict[str, Any]:
        return {"set": {"family": "inet", "name": "seen", "flags": ["dynamic"], "elem": list(elem)}}

    assert without_volatile(rule(1, 4)) == without_volatile(rule(9000, 7))
    assert without_volatile(dynamic_set("a")) == without_volatile(dynamic_set("a", "b"))
    drop = {"rule": {**rule(1, 4)["rule"], "expr": [{"drop": None}]}}
    assert without_volatile(rule(1, 4)) != without_volatile(drop)


def _guard(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELPROXY_HOSTGUARD")}
    return subprocess.run(
        [sys.executable, "-m", "tests.support.hostguard", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("network namespaces need root, which CI has", pytrace=False)
        pytest.skip("network namespaces need root")
    with Netns() as ns:
        yield ns.name


def test_guard_command_fails_naming_a_vanished_bridge_route_and_rule(
    netns: str, tmp_path: Path
) -> None:
    def ns(*cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", netns, *cmd], check=True, capture_output=True)

    bridge = "docker0"  # in the test's own namespace: no host link of that name is involved
    ns("ip", "link", "add", bridge, "type", "bridge")
    ns("ip", "addr", "add", "203.0.113.5/24", "dev", bridge)
    ns("ip", "link", "set", bridge, "up")
    ns("iptables", "-A", "INPUT", "-s", "203.0.113.9/32", "-j", "DROP")
    before = tmp_path / "before.json"
    snap = _guard("snapshot", "--netns", netns)
    assert snap.returncode == 0, snap.stderr
    before.write_text(snap.stdout)
    assert bridge in json.loads(snap.stdout)["links"]

    unchanged = _guard("compare", str(before), "--netns", netns)
    assert unchanged.returncode == 0, unchanged.stderr
    assert "host networking unchanged" in unchanged.stdout

    ns("ip", "link", "delete", bridge, "type", "bridge")
    ns("iptables", "-D", "INPUT", "-s", "203.0.113.9/32", "-j", "DROP")
    changed = _guard("compare", str(before), "--netns", netns)
    assert changed.returncode == 1
    failed = [line for line in changed.stderr.splitlines() if "FAILED" in line]
    assert any(f"bridge {bridge} (bridge, inet 203.0.113.5/24" in line for line in failed)
    assert any("route 203.0.113.0/24" in line and bridge in line for line in failed)
    assert any("-A INPUT -s 203.0.113.9/32 -j DROP" in line for line in failed)
    assert "changed this host's networking" in changed.stderr
