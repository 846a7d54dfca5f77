"""Conntrack, through pyroute2's ctnetlink socket: live flows per route, and cutting them.

Every flow the kernel forwards for a route carries the route's conntrack mark
(`MARK_BASE | slot`, set by the route's admission chain). `active_by_slot()` dumps only
labelproxy's flows (the kernel filters by mark and mask) and counts them per slot: a TCP flow
counts while it is not in TIME_WAIT or CLOSE (what `ct count` counts too), a UDP flow while its
entry lives (its idle timeout). `cut(slot)` deletes a route's entries (both address families):
the next packet of such a flow is no longer translated, and the route's admission (or, once the
route is gone, the socket on the listen port) answers it with a reset.

Each call opens and closes its own netlink socket, so the functions are safe from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pyroute2 import Conntrack

from labelproxy.kernel.model import MARK_BASE, MARK_MASK, slot_of_mark

logger = logging.getLogger(__name__)

TCP_TIME_WAIT = 7  # TCP_CONNTRACK_* from linux/netfilter/nf_conntrack_tcp.h
TCP_CLOSE = 8
GONE_TCP_STATES = frozenset({TCP_TIME_WAIT, TCP_CLOSE})


class ConntrackError(Exception):
    """Conntrack could not be read or changed; the message says what failed."""


@contextlib.contextmanager
def _socket() -> Iterator[Any]:
    try:
        ct = Conntrack(nfgen_family=socket.AF_UNSPEC)
    except OSError as exc:
        raise ConntrackError(f"conntrack netlink socket: {exc}") from exc
    try:
        yield ct
    finally:
        ct.close()


def _tcp_state(message: Any) -> int | None:
    info = message.get_attr("CTA_PROTOINFO")
    tcp = info.get_attr("CTA_PROTOINFO_TCP") if info is not None else None
    state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE") if tcp is not None else None
    return int(state) if state is not None else None


def active_by_slot() -> dict[int, int]:
    """Live flows of every labelproxy route: slot -> count (see the module docstring)."""
    counts: Counter[int] = Counter()
    with _socket() as ct:
        try:
            for message in ct.dump(mark=MARK_BASE, mark_mask=MARK_MASK):
                slot = slot_of_mark(int(message.get_attr("CTA_MARK") or 0))
                if slot is None or _tcp_state(message) in GONE_TCP_STATES:
                    continue
                counts[slot] += 1
        except OSError as exc:
            raise ConntrackError(f"conntrack dump: {exc}") from exc
    return dict(counts)


def slots_in_use() -> set[int]:
    """Slots that still have conntrack entries (TIME_WAIT included): not free for reuse."""
    found: set[int] = set()
    with _socket() as ct:
        try:
            for message in ct.dump(mark=MARK_BASE, mark_mask=MARK_MASK):
                slot = slot_of_mark(int(message.get_attr("CTA_MARK") or 0))
                if slot is not None:
                    found.add(slot)
        except OSError as exc:
            raise ConntrackError(f"conntrack dump: {exc}") from exc
    return found


def cut(slot: int) -> None:
    """Delete every conntrack entry of route `slot` (both address families)."""
    with _socket() as ct:
        try:
            ct.flush(mark=MARK_BASE | slot, mark_mask=0xFFFF_FFFF)
        except OSError as exc:
            raise ConntrackError(f"conntrack delete of route {slot}: {exc}") from exc


def cut_all() -> None:
    """Delete every conntrack entry that carries a labelproxy mark."""
    with _socket() as ct:
        try:
            ct.flush(mark=MARK_BASE, mark_mask=MARK_MASK)
        except OSError as exc:
            raise ConntrackError(f"conntrack delete: {exc}") from exc
