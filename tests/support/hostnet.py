"""Networking objects the test suite creates for itself, named so they can be proven its own.

Every link or network namespace the suite makes is named `lpt<pid>-<n>` (`RUN_PREFIX`): unique to
this test process, at most 15 characters (the kernel's limit for a link name). Only such an
object, created by this process, is ever deleted, and only after checking it is still the one
that was created (same name and interface index). Nothing is ever deleted by a name pattern.

`SuiteBridge` is the bridge a private dockerd is started with (`dockerd -b NAME`, DESIGN.md
section 4): its address is a small subnet of a documentation range (RFC 5737) that overlaps no
address or route already present, chosen under a file lock so concurrent test runs on one host
(or two engines of one run) each get their own. `Netns` is a network namespace of the suite's own.
`ip_json` runs `ip -j` in the host's or a given namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_PREFIX = f"lpt{os.getpid()}-"
# The bridges' subnets: /26s of the three documentation ranges (62 addresses each, enough for
# the few containers the suite runs on an engine's default bridge network).
BRIDGE_SUBNETS = tuple(
    subnet
    for block in ("198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24")
    for subnet in ipaddress.IPv4Network(block).subnets(new_prefix=26)
)
# The private engines' user-defined networks take /24s from this block (`default-address-pools`).
ENGINE_POOL = ipaddress.IPv4Network("10.213.0.0/16")
LOCK_PATH = Path(tempfile.gettempdir()) / "labelproxy-tests-bridges.lock"
_counter = itertools.count(1)


class HostNetError(Exception):
    """A suite-owned network object could not be created; the message says which and why."""


def _ip(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    return subprocess.run([*prefix, *args], capture_output=True, text=True, check=False)


def ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    """`ip -j ARGS` (in `netns` when given) as parsed JSON; empty when it prints nothing."""
    done = _ip("-j", *args, netns=netns)
    if done.returncode != 0:
        raise HostNetError(f"ip -j {' '.join(args)} failed: {done.stderr.strip()}")
    out = done.stdout.strip()
    parsed: list[dict[str, Any]] = json.loads(out) if out else []
    return parsed


def link_index(name: str, *, netns: str | None = None) -> int | None:
    """The interface index of link `name`, or None when there is no such link."""
    done = _ip("-j", "link", "show", "dev", name, netns=netns)
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return int(json.loads(done.stdout)[0]["ifindex"])


def unique_name(*, netns: str | None = None) -> str:
    """A run-unique `lpt<pid>-<n>` name no link has right now (in `netns` when given)."""
    for _ in range(1000):
        name = f"{RUN_PREFIX}{next(_counter)}"
        if len(name) > 15:
            raise HostNetError(f"run-unique name {name!r} is longer than 15 characters")
        if link_index(name, netns=netns) is None:
            return name
    raise HostNetError(f"no free name with prefix {RUN_PREFIX!r}")


def _taken_networks(netns: str | None) -> list[ipaddress.IPv4Network]:
    """Every IPv4 network in use: address prefixes and non-default routes of every table."""
    taken = [
        ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
        for link in ip_json("-4", "addr", "show", netns=netns)
        for a in link.get("addr_info", [])
        if "local" in a
    ]
    for route in ip_json("-4", "route", "show", "table", "all", netns=netns):
        dst = route.get("dst", "default")
        if dst != "default":
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.IPv4Network(dst, strict=False))
    return taken


@contextlib.contextmanager
def _bridges_lock() -> Iterator[None]:
    with LOCK_PATH.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class SuiteBridge:
    """A Linux bridge this process created, with an address of its own; see the module doc."""

    def __init__(self, name: str, ifindex: int, address: ipaddress.IPv4Interface,
                 netns: str | None) -> None:  # fmt: skip
        self.name = name
        self.ifindex = ifindex
        self.address = address
        self.netns = netns

    @classmethod
    def create(cls, *, netns: str | None = None) -> SuiteBridge:
        """Create a bridge with a run-unique name and the first free documentation subnet."""
        with _bridges_lock():
            taken = _taken_networks(netns)
            free = [s for s in BRIDGE_SUBNETS if not any(s.overlaps(t) for t in taken)]
            if not free:
                raise HostNetError(
                    f"every candidate bridge subnet ({BRIDGE_SUBNETS[0]} ... "
                    f"{BRIDGE_SUBNETS[-1]}) overlaps an address or route of this host"
                )
            name = unique_name(netns=netns)
            added = _ip("link", "add", name, "type", "bridge", netns=netns)
            if added.returncode != 0:
                raise HostNetError(f"ip link add {name} type bridge: {added.stderr.strip()}")
            index = link_index(name, netns=netns)
            if index is None:
                raise HostNetError(f"bridge {name} vanished right after it was created")
            bridge = cls(name, index, ipaddress.IPv4Interface(f"{free[0][1]}/26"), netns)
            addr = _ip("addr", "add", str(bridge.address), "dev", name, netns=netns)
            if addr.returncode != 0:
                bridge.delete()
                raise HostNetError(f"ip addr add {bridge.address} dev {name}: {addr.stderr}")
        logger.info("created bridge %s (%s)%s", name, bridge.address, f" in {netns}" * bool(netns))
        return bridge

    def delete(self) -> None:
        """Delete the bridge if it is still the one created (same name and index)."""
        index = link_index(self.name, netns=self.netns)
        if index is None:
            return
        if index != self.ifindex:
            logger.warning("link %s is not the bridge this run created (index %d, not %d): "
                           "leaving it", self.name, index, self.ifindex)  # fmt: skip
            return
        done = _ip("link", "delete", self.name, "type", "bridge", netns=self.netns)
        if done.returncode != 0:
            logger.warning("could not delete bridge %s: %s", self.name, done.stderr.strip())


class Netns:
    """A network namespace this process created (run-unique name), deleted by that name."""

    def __init__(self) -> None:
        self.name = ""

    def __enter__(self) -> Netns:
        existing = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
        for _ in range(1000):
            name = f"{RUN_PREFIX}{next(_counter)}"
            if name in existing:
                continue
            done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                                  check=False)  # fmt: skip
            if done.returncode != 0:
                raise HostNetError(f"ip netns add {name}: {done.stderr.strip()}")
            self.name = name
            _ip("link", "set", "lo", "up", netns=name)
            return self
        raise HostNetError(f"no free namespace name with prefix {RUN_PREFIX!r}")

    def __exit__(self, *exc: object) -> None:
        if self.name:
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, check=False)
            self.name = ""
