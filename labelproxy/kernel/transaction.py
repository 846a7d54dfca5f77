"""One nftables transaction that turns the table we have into the table we want (pure).

`transaction(old, new)` compares two `Table`s by name and returns libnftables JSON commands;
applied as one batch (`nft -j -f -`) they change the table atomically. Only what differs is
touched, so one route's change is a handful of commands however many routes there are:

1. create what is missing: the table, ct timeouts, sets and maps, chains. Objects of the
   same name are the same object (names carry what they hold), so a timeout policy in use
   stays attached to its flows;
2. remove map and set elements that went or changed (ACL sets are replaced whole), which also
   drops every reference to the chains of removed routes. Elements of counted sets are
   compared by key only, so a route's counters stay as long as the route does;
3. rewrite chains whose rules changed (flush, then add), and flush chains that go;
4. add the new and changed elements;
5. delete what is gone: chains, then sets and timeout policies, none referenced now.

Conntrack timeout policies are the exception to "one JSON batch": nft 1.0.6 (Debian 12) drops
a policy given in JSON and aborts on a JSON `delete ct timeout`, so they are created in a text
batch before the JSON one (`prepare`) and deleted in one after it (`cleanup`). Both are safe
outside the JSON batch: a policy nobody references changes no packet.

A table read back from the kernel (`rules=None`, elements in nftables' own spelling) is treated
as unknown: its chains are rewritten and its sets refilled (counted sets excepted: their
elements are matched by key, so counters survive a restart), except the chains the caller names
in `keep` (admission chains whose digest in the registry matches: they keep their `ct count`
state).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from labelproxy.kernel.model import (
    TABLE_FAMILY,
    TABLE_NAME,
    Chain,
    Json,
    NamedSet,
    Table,
    key_of,
)

logger = logging.getLogger(__name__)

WHOLE_SETS_PREFIXES = ("a4", "a6", "d4", "d6")  # ACL sets: small, replaced whole


@dataclass(frozen=True, slots=True)
class Transaction:
    """Text commands to run first, the JSON batch, then text commands to run last."""

    prepare: tuple[str, ...]
    commands: list[Json]
    cleanup: tuple[str, ...]

    @property
    def empty(self) -> bool:
        """True when nothing but the idempotent `add table` would be sent."""
        return not self.prepare and not self.cleanup and len(self.commands) <= 1


def timeout_text(family: str, table: str, name: str, body: Json) -> str:
    """`add ct timeout ...` in nft's own syntax (see the module docstring for why)."""
    policy = ", ".join(f"{state}: {int(value)}" for state, value in body["policy"].items())
    return (
        f"add ct timeout {family} {table} {name} {{ protocol {body['protocol']}; "
        f"l3proto {body['l3proto']}; policy = {{ {policy} }}; }}"
    )


class _Commands:
    def __init__(self, family: str, table: str) -> None:
        self.family, self.table = family, table
        self.items: list[Json] = []

    def __call__(self, verb: str, kind: str, name: str | None = None, **body: Json) -> None:
        item: dict[str, Json] = {"family": self.family}
        if kind == "table":
            item["name"] = self.table
        else:
            item["table"] = self.table
            item["name" if kind != "rule" else "chain"] = name
        item.update(body)
        self.items.append({verb: {kind: item}})


def _set_body(named: NamedSet) -> dict[str, Json]:
    body: dict[str, Json] = {"type": list(named.type) if isinstance(named.type, tuple)
                             else named.type}
    if named.flags:
        body["flags"] = list(named.flags)
    if named.data is not None:
        body["map"] = named.data
    if named.counter:
        body["stmt"] = [{"counter": None}]
    return body


def _chain_body(chain: Chain) -> dict[str, Json]:
    if chain.hook is None:
        return {}
    kind, hook, prio = chain.hook
    return {"type": kind, "hook": hook, "prio": prio, "policy": "accept"}


def _whole(named: NamedSet) -> bool:
    return named.name.startswith(WHOLE_SETS_PREFIXES)


def _element_changes(
    old: NamedSet | None, new: NamedSet, *, known: bool
) -> tuple[bool, list[Json], list[Json]]:
    """(flush first?, elements to delete, elements to add) for one set or map."""
    if old is None:
        return False, [], list(new.elements.values())
    if new.counter:  # elements are keys; what the kernel adds (counter values) is not ours
        gone = [key_of(element) for key, element in old.elements.items()
                if key not in new.elements]
        return False, gone, [e for key, e in new.elements.items() if key not in old.elements]
    if not known or (_whole(new) and dict(old.elements) != dict(new.elements)):
        return bool(old.elements) or not known, [], list(new.elements.values())
    gone = [
        key_of(element)
        for key, element in old.elements.items()
        if new.elements.get(key) != element
    ]
    added = [
        element for key, element in new.elements.items() if old.elements.get(key) != element
    ]
    return False, gone, added


def transaction(
    old: Table | None,
    new: Table,
    *,
    known: bool = True,
    keep: frozenset[str] = frozenset(),
    family: str = TABLE_FAMILY,
    table: str = TABLE_NAME,
) -> Transaction:
    """The commands that turn `old` (None: no table) into `new`; see the module docstring.

    `known=False` says `old` was read back from the kernel: element spellings may differ from
    ours, so every set is refilled, and every chain not in `keep` is rewritten.
    """
    have = old if old is not None else Table()
    cmd = _Commands(family, table)
    cmd("add", "table")
    prepare = tuple(
        timeout_text(family, table, name, new.timeouts[name])
        for name in sorted(set(new.timeouts) - set(have.timeouts))
    )
    if prepare:
        prepare = (f"add table {family} {table}", *prepare)
    for name in sorted(set(new.sets) - set(have.sets)):
        cmd("add", "set" if new.sets[name].data is None else "map", name,
            **_set_body(new.sets[name]))
    for name in sorted(set(new.chains) - set(have.chains)):
        cmd("add", "chain", name, **_chain_body(new.chains[name]))
    additions: list[tuple[NamedSet, list[Json]]] = []
    for name in sorted(new.sets):
        named = new.sets[name]
        kind = "set" if named.data is None else "map"
        flush, gone, added = _element_changes(have.sets.get(name), named, known=known)
        if flush:
            cmd("flush", kind, name)
        if gone:
            cmd("delete", "element", name, elem=gone)
        additions.append((named, added))
    for name in sorted(set(have.sets) - set(new.sets)):
        cmd("flush", "set" if have.sets[name].data is None else "map", name)
    for name in sorted(new.chains):
        _rewrite(cmd, have.chains.get(name), new.chains[name], known=known,
                 keep=name in keep)
    for name in sorted(set(have.chains) - set(new.chains)):
        cmd("flush", "chain", name)
    for named, added in additions:
        if added:
            cmd("add", "element", named.name, elem=added)
    for name in sorted(set(have.chains) - set(new.chains)):
        cmd("delete", "chain", name)
    for name in sorted(set(have.sets) - set(new.sets)):
        cmd("delete", "set" if have.sets[name].data is None else "map", name)
    cleanup = tuple(
        f"delete ct timeout {family} {table} {name}"
        for name in sorted(set(have.timeouts) - set(new.timeouts))
    )
    return Transaction(prepare=prepare, commands=cmd.items, cleanup=cleanup)


def _rewrite(cmd: _Commands, old: Chain | None, new: Chain, *, known: bool, keep: bool) -> None:
    if old is not None:
        same = old.rules == new.rules and (known or old.rules is not None)
        if same or (not known and keep):
            return
        if old.rules is None or old.rules:
            cmd("flush", "chain", new.name)
    family, table, name = cmd.family, cmd.table, new.name
    cmd.items.extend(
        {"add": {"rule": {"family": family, "table": table, "chain": name, "expr": list(rule)}}}
        for rule in new.rules or ()
    )


def delete_table(*, family: str = TABLE_FAMILY, table: str = TABLE_NAME) -> list[Json]:
    """The commands that remove labelproxy's table, whatever it holds (none if it is absent:
    `add` first makes the delete succeed either way)."""
    ident = {"family": family, "name": table}
    return [{"add": {"table": dict(ident)}}, {"delete": {"table": dict(ident)}}]

