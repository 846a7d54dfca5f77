"""Talking to nftables: the `nft` program of Debian's `nftables` package, in JSON.

`Nft.apply(commands)` runs one transaction with `nft -j -f -` (libnftables sends it as one
netlink batch: all of it happens or none does). `Nft.read()` lists labelproxy's table and turns
it into a `Table` (names, element keys; rules unknown) plus the route registry kept in the
`routes_v1` set (slot -> identity, from the element comments), or None when there is no table.
`Nft.counted(names)` reads the per-element counters of the table's counted sets (one `nft`
per set, run side by side).
`Nft.probe()` says whether nftables can be used here at all (binary present, CAP_NET_ADMIN,
the kernel takes nat, conntrack marks, `ct count` and a reject in prerouting) by checking a
throwaway table (`labelproxy_probe`, added and deleted at once).

Only labelproxy's own table is ever named in a command; nothing here lists or changes another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from labelproxy.kernel.model import (
    ROUTES_SET,
    TABLE_FAMILY,
    TABLE_NAME,
    Chain,
    Json,
    NamedSet,
    Table,
    element_key,
    key_of,
)
from labelproxy.kernel.transaction import Transaction

logger = logging.getLogger(__name__)

NFT_TIMEOUT = 30.0
PROBE_TABLE = "labelproxy_probe"
_NFPROTO = {"meta": {"key": "nfproto"}}
NEVER: list[Json] = [  # no packet is both: the probe's rules are loaded, never run
    {"match": {"op": "==", "left": _NFPROTO, "right": "ipv4"}},
    {"match": {"op": "==", "left": _NFPROTO, "right": "ipv6"}},
]


class NftError(Exception):
    """`nft` failed; the message carries its first error line."""


@dataclass(frozen=True, slots=True)
class Adopted:
    """What an existing table holds: its model and the route registry (slot -> identity)."""

    table: Table
    routes: dict[int, str]


def _first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    return (errors or lines or ["no message"])[0]


class Nft:
    """The `nft` program, always aimed at one table (`family`, `table`)."""

    def __init__(
        self, *, binary: str = "nft", family: str = TABLE_FAMILY, table: str = TABLE_NAME
    ) -> None:
        self.binary, self.family, self.table = binary, family, table

    def _run(self, args: Sequence[str], stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                [self.binary, *args], input=stdin, capture_output=True, text=True,
                timeout=NFT_TIMEOUT, check=False,
            )
        except FileNotFoundError as exc:
            raise NftError(f"{self.binary}: not found (install the nftables package)") from exc
        if done.returncode != 0:
            raise NftError(f"nft {' '.join(args[:3])}: {_first_error(done.stderr)}")
        return done.stdout

    def apply(self, commands: Sequence[Json], *, check: bool = False) -> None:
        """Run `commands` as one atomic transaction (`check`: validate only, change nothing)."""
        if not commands:
            return
        payload = json.dumps({"nftables": list(commands)}, separators=(",", ":"))
        self._run(["--check", "-j", "-f", "-"] if check else ["-j", "-f", "-"], payload)

    def run_text(self, lines: Sequence[str]) -> None:
        """Run commands in nft's own syntax as one batch (see `transaction` for why)."""
        if lines:
            self._run(["-f", "-"], "\n".join(lines) + "\n")

    def commit(self, tx: Transaction) -> None:
        """Carry out a `Transaction`: its text preparation, its JSON batch, its cleanup."""
        self.run_text(tx.prepare)
        self.apply(tx.commands)
        self.run_text(tx.cleanup)

    def _list(self, *what: str) -> list[Json] | None:
        try:
            out = self._run(["-j", "list", *what])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        items: list[Json] = json.loads(out).get("nftables", [])
        return items

    def read(self) -> Adopted | None:
        """The table as the kernel has it, or None when it does not exist."""
        items = self._list("table", self.family, self.table)
        if items is None:
            return None
        return parse_listing(items)

    def counted(self, names: Sequence[str]) -> dict[str, dict[str, tuple[int, int]]]:
        """The per-element counters of the counted sets `names`: set -> element key ->
        (packets, bytes); a set that does not exist is left out. One `nft` per set, all at
        once: listing only them is quicker than listing every set of the table."""
        procs = {
            name: subprocess.Popen(
                [self.binary, "-j", "list", "set", self.family, self.table, name],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for name in names
        }  # fmt: skip
        outputs: dict[str, str] = {}
        try:
            for name, proc in procs.items():
                out, err = proc.communicate(timeout=NFT_TIMEOUT)
                if proc.returncode == 0:
                    outputs[name] = out
                elif "No such file or directory" not in err:
                    raise NftError(f"nft -j list set {name}: {_first_error(err)}")
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        found: dict[str, dict[str, tuple[int, int]]] = {}
        for out in outputs.values():
            for item in json.loads(out).get("nftables", []):
                body = item.get("set")
                if body is None or body.get("table") != self.table or "stmt" not in body:
                    continue
                values = found[body["name"]] = {}
                for element in body.get("elem", []):
                    inner = element.get("elem") if isinstance(element, dict) else None
                    if inner is not None and "counter" in inner:
                        counter = inner["counter"]
                        values[element_key(inner["val"])] = (counter["packets"],
                                                             counter["bytes"])
        return found

    def probe(self) -> str | None:
        """None when this process can program nftables; otherwise why not, in one line."""
        if shutil.which(self.binary) is None:
            return f"{self.binary} not found (install the nftables package)"
        ident = {"family": self.family, "table": PROBE_TABLE}
        table = {"family": self.family, "name": PROBE_TABLE}
        commands: list[Json] = [{"add": {"table": table}}]
        for name, kind, hook, prio, expr in (
            ("nat", "nat", "prerouting", -100,
             [{"mangle": {"key": {"ct": {"key": "mark"}}, "value": 1}}]),
            ("snat", "nat", "postrouting", 100, [{"masquerade": None}]),
            ("pre", "filter", "prerouting", -150,
             [{"ct count": {"val": 1, "inv": True}}, {"reject": {"type": "tcp reset"}}]),
        ):
            commands.append({"add": {"chain": {**ident, "name": name, "type": kind,
                                               "hook": hook, "prio": prio,
                                               "policy": "accept"}}})
            commands.append({"add": {"rule": {**ident, "chain": name,
                                              "expr": [*NEVER, *expr]}}})
        # a real commit (`--check` skips the kernel's per-hook validation) of a table whose
        # rules match no packet, deleted at once
        try:
            self.apply(commands)
        except NftError as exc:
            return str(exc)
        finally:
            with contextlib.suppress(NftError):
                self.apply([{"add": {"table": dict(table)}}, {"delete": {"table": table}}])
        return None


def _set_of(item: Json, *, is_map: bool) -> NamedSet:
    elements: dict[str, Json] = {}
    for element in item.get("elem", []):
        elements[element_key(key_of(element))] = element
    kind = item["type"]
    return NamedSet(
        item["name"],
        tuple(kind) if isinstance(kind, list) else kind,
        flags=tuple(item.get("flags", ())),
        data=item.get("map") if is_map else None,
        elements=elements,
        counter="stmt" in item,
    )


def parse_listing(items: Sequence[Json]) -> Adopted:
    """`nft -j list table` output -> `Adopted` (pure; rules are left unknown)."""
    chains: dict[str, Chain] = {}
    sets: dict[str, NamedSet] = {}
    timeouts: dict[str, Json] = {}
    routes: dict[int, str] = {}
    for item in items:
        if "chain" in item:
            body = item["chain"]
            hook = (body["type"], body["hook"], int(body["prio"])) if "hook" in body else None
            chains[body["name"]] = Chain(body["name"], None, hook)
        elif "set" in item or "map" in item:
            is_map = "map" in item
            named = _set_of(item["map" if is_map else "set"], is_map=is_map)
            sets[named.name] = named
        elif "ct timeout" in item:
            body = item["ct timeout"]
            timeouts[body["name"]] = {k: body[k] for k in ("protocol", "l3proto", "policy")
                                      if k in body}
    registry = sets.get(ROUTES_SET)
    for element in registry.elements.values() if registry else ():
        if isinstance(element, dict) and "elem" in element:
            slot, comment = element["elem"].get("val"), element["elem"].get("comment")
            if isinstance(slot, int) and isinstance(comment, str):
                routes[slot] = comment
    table = Table(chains=chains, sets=sets, timeouts=timeouts)
    return Adopted(table=table, routes=routes)
