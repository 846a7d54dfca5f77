"""The kernel engine: forwards eligible routes with nftables and reads their counters.

`KernelEngine` is small and synchronous (every call is a few subprocess or netlink round trips;
the runtime calls it from a worker thread, one call at a time: a lock makes that safe anyway):

    engine = KernelEngine(policy=edge_policy)     # EdgePolicy: ACL, UDP defaults, drain timeout
    engine.probe()                                # None, or why nftables is unusable here
    engine.start()                                # "adopted" / "rebuilt" / "created": reads the
                                                  # table a previous run left, changes nothing yet
    result = engine.apply(specs)                  # the complete set of kernel routes; idempotent
    engine.counters()                             # listen key -> RouteCounters, at scrape time
    engine.next_deadline(); engine.cut_expired()  # drain deadlines of removed routes
    engine.close()                                # table gone, forwarded flows cut

A route is identified by its listen key and alias (`route_identity`): while that holds it keeps
its slot, its conntrack mark, its counters and its flows, whatever else changes. A route that
leaves `apply` stops taking new flows at once (its listen-map entries go in the same
transaction); its established flows keep going through conntrack until `cut_expired()` deletes
them at `policy.drain_timeout`; its slot is not reused before that.

Restarts: the table outlives the process. `start()` adopts a table of the same layout: the
first `apply` then rewrites rules in one transaction, keeping counters, timeout policies, the
`ct count` lists and every established flow (conntrack holds their translation), so a restart
(even after SIGKILL) cuts nothing; flows of routes that did not come back drain and are cut at
the deadline. A table of another layout is deleted and rebuilt. `close(keep=True)` leaves
everything as it is for a successor; `close()` removes the table, cuts labelproxy's flows and
switches route_localnet back off if this engine switched it on.

The engine does not bind the listen port. The caller keeps a socket bound there (the relay's
own listener is best: the kernel translates the flows it carries before any socket sees them,
and whatever it does not carry - the other address family of a dual-stack route, or every flow
while the engine is down - reaches the relay instead of a closed port).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from labelproxy.kernel import conntrack, host
from labelproxy.kernel.eligible import IPFamily, Verdict, eligible
from labelproxy.kernel.model import (
    MAX_SLOT,
    ROUTES_SET,
    Chain,
    KernelRoute,
    Table,
    route_identity,
)
from labelproxy.kernel.nft import Nft
from labelproxy.kernel.routerules import COUNTED_SETS, Fragment, chain_digest
from labelproxy.kernel.ruleset import build
from labelproxy.kernel.transaction import delete_table, transaction
from labelproxy.spec import Backend, EdgePolicy, ListenKey, RouteSpec

logger = logging.getLogger(__name__)

LOCALNET_SLOT = 0  # registry entry recording that this engine switched route_localnet on
_NO_CHAIN = Chain("none", None)
MAX_COUNT = 2**32 - 1  # ct count and timeout policies hold 32 bits: a larger cap is no cap

Ready = Callable[[ListenKey, Backend], bool]  # is this backend of this route ready?


def ready_pool(spec: RouteSpec, ready: Ready | None) -> RouteSpec:
    """`spec` with only the backends `ready` accepts (`spec` itself when all are)."""
    if ready is None:
        return spec
    kept = tuple(b for b in spec.backends if ready(spec.key, b))
    return spec if len(kept) == len(spec.backends) else dataclasses.replace(spec, backends=kept)


@dataclass(frozen=True, slots=True)
class RouteState:
    """What `/routes` shows about a kernel route."""

    key: ListenKey
    alias: str
    slot: int
    mark: int
    families: tuple[IPFamily, ...]
    uncovered: tuple[IPFamily, ...]
    client_address_hidden: bool
    limit: int | None
    idle_timeout: int | None
    pool: tuple[Backend, ...] = ()  # the backends new flows go to (the ready ones)


@dataclass(frozen=True, slots=True)
class RouteCounters:
    """One route's kernel counters. Packets and bytes are IP packets as the hooks see them
    (bytes include IP and transport headers; after GRO one packet may carry many segments);
    `in` = client to upstream (conntrack's original direction), `out` = upstream to client."""

    connections: int
    active: int
    packets_in: int
    bytes_in: int
    packets_out: int
    bytes_out: int
    rejected: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """Routes now forwarded by the kernel, and the specs it refused (key -> reason)."""

    routes: Mapping[ListenKey, RouteState]
    refused: Mapping[ListenKey, str]


@dataclass(slots=True)
class _Draining:
    identity: str
    slot: int
    deadline: float


class KernelEngine:
    """See the module docstring."""

    def __init__(
        self,
        *,
        policy: EdgePolicy,
        nft: Nft | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.nft = nft or Nft()
        self.clock = clock
        self._lock = threading.Lock()
        self._table: Table | None = None
        self._known = True
        self._rebuild = False
        self._slots: dict[str, int] = {}
        self._routes: dict[str, KernelRoute] = {}
        self._verdicts: dict[str, Verdict] = {}
        self._draining: dict[int, _Draining] = {}
        self._localnet_owned = False
        self._digests: dict[int, str] = {}  # slot -> admission digest of an adopted table
        self._fragments: dict[KernelRoute, Fragment] = {}
        self._eligible: dict[RouteSpec, Verdict] = {}  # pure verdicts of the last apply

    def probe(self) -> str | None:
        """None when nftables can be programmed here; otherwise the reason, one line."""
        return self.nft.probe()

    def assess(self, spec: RouteSpec, paths: host.PathCache | None = None) -> Verdict:
        """`eligible` plus what only this host can tell (forwarding switched on)."""
        verdict = self._eligible.get(spec) or eligible(spec, policy=self.policy)
        return self._on_this_host(spec, verdict, paths or host.PathCache())

    @staticmethod
    def _on_this_host(spec: RouteSpec, verdict: Verdict, paths: host.PathCache) -> Verdict:
        if not verdict.kernel:
            return verdict
        for backend in spec.backends:
            version = 6 if ":" in backend.host else 4
            if paths.kind(backend.host) != "local" and not paths.forwarding(version):
                return Verdict(False, f"backend {backend} is not on this host and IPv{version} "
                               "forwarding is off in labelproxy's network namespace")
        return verdict

    def start(self) -> str:
        """Read the table a previous run left; change nothing until the first `apply`."""
        with self._lock:
            adopted = self.nft.read()
            orphans = conntrack.slots_in_use()
            if adopted is None:
                outcome = "created"
            elif ROUTES_SET not in adopted.table.sets:
                outcome, self._rebuild = "rebuilt", True
            else:
                outcome, self._table, self._known = "adopted", adopted.table, False
                self._localnet_owned = LOCALNET_SLOT in adopted.routes
                for slot, comment in adopted.routes.items():
                    digest, _, identity = comment.partition(" ")
                    if slot != LOCALNET_SLOT and identity:
                        self._slots[identity], self._digests[slot] = slot, digest
            deadline = self.clock() + self.policy.drain_timeout
            for slot in orphans - set(self._slots.values()):
                self._draining[slot] = _Draining(f"slot {slot}", slot, deadline)
            logger.info("kernel table %s (%d routes, %d draining)", outcome, len(self._slots),
                        len(self._draining), extra={"action": f"kernel {outcome}"})
            return outcome

    def _plan(self, spec: RouteSpec, verdict: Verdict, slot: int,
              paths: host.PathCache, ready: Ready | None) -> KernelRoute:
        limit = spec.connection_limit(udp_default=self.policy.udp_max_sessions)
        idle = spec.options.idle_timeout
        if idle is None and spec.transport == "udp":
            idle = self.policy.udp_idle_timeout
        return KernelRoute(
            spec=ready_pool(spec, ready),
            slot=slot,
            families=verdict.families,
            masquerade=any(not paths.returns_here(b.host) for b in spec.backends),
            limit=limit if limit is not None and limit <= MAX_COUNT else None,
            idle_timeout=min(MAX_COUNT, max(1, math.ceil(idle))) if idle is not None else None,
        )

    def apply(self, specs: Iterable[RouteSpec], *, ready: Ready | None = None) -> ApplyResult:
        """Make the kernel forward exactly `specs` (those it can; the others are refused),
        each with the backends `ready(key, backend)` accepts (all without it). Whether a
        route is the kernel's, its families and masquerading are judged on all its backends,
        so a route's path does not change with its backends' health.

        Raises `NftError` (or `OSError`) when the kernel refuses the change; the table and
        the engine's state are then as they were, and the next `apply` tries again.
        """
        with self._lock:
            refused: dict[ListenKey, str] = {}
            wanted: dict[str, tuple[RouteSpec, Verdict]] = {}
            paths = host.PathCache()
            pure: dict[RouteSpec, Verdict] = {}
            for spec in specs:
                pure[spec] = self._eligible.get(spec) or eligible(spec, policy=self.policy)
                verdict = self._on_this_host(spec, pure[spec], paths)
                if verdict.kernel:
                    wanted[route_identity(spec)] = (spec, verdict)
                else:
                    refused[spec.key] = verdict.reason
            self._localnet(wanted, refused)
            slots = {i: slot for i, slot in self._slots.items() if i in wanted}
            draining = dict(self._draining)
            deadline = self.clock() + self.policy.drain_timeout
            for identity in set(self._slots) - set(wanted):
                slot = self._slots[identity]
                draining[slot] = _Draining(identity, slot, deadline)
            used = set(slots.values()) | set(draining)
            free = (slot for slot in range(1, MAX_SLOT + 1) if slot not in used)
            routes: dict[str, KernelRoute] = {}
            for identity, (spec, verdict) in wanted.items():
                if identity not in slots:
                    slots[identity] = next(free, 0)
                    if not slots[identity]:
                        raise RuntimeError(f"more than {MAX_SLOT} kernel routes")
                routes[identity] = self._plan(spec, verdict, slots[identity], paths, ready)
            self._commit(routes)
            for identity in set(self._slots) - set(wanted):
                logger.debug("kernel route %s removed: draining until its deadline", identity,
                            extra={"action": "kernel drain"})
            for identity in set(routes) - set(self._routes):
                logger.debug("kernel route %s up", identity, extra={"action": "kernel up"})
            self._eligible, self._slots, self._draining, self._routes = (
                pure, slots, draining, routes)
            self._verdicts = {identity: verdict for identity, (_, verdict) in wanted.items()}
            return ApplyResult(routes=self._states(), refused=refused)

    def _localnet(self, wanted: dict[str, tuple[RouteSpec, Verdict]],
                  refused: dict[ListenKey, str]) -> None:
        """IPv4 routes need route_localnet on (remote clients of a loopback backend, loopback
        clients of another one): switch it on; where that is not allowed (a container's
        read-only /proc/sys), such routes are refused with the reason."""
        ipv4 = [identity for identity, (_, v) in wanted.items() if "ipv4" in v.families]
        if not ipv4 or host.route_localnet():
            return
        try:
            host.set_route_localnet(True)
        except OSError as exc:
            missing = exc.strerror or str(exc)
        else:
            self._localnet_owned = True
            return
        for identity in ipv4:
            spec = wanted[identity][0]
            who = host.localnet_clients(spec)
            if who is not None:
                del wanted[identity]
                refused[spec.key] = (f"{who} need net.ipv4.conf.all.route_localnet=1, which "
                                     f"labelproxy cannot set here ({missing})")

    def _commit(self, routes: dict[str, KernelRoute]) -> None:
        """Program the table for `routes` in one transaction (see `apply`)."""
        guard = any("ipv4" in route.families for route in routes.values())
        table = build(routes.values(), policy=self.policy, localnet_guard=guard,
                      localnet_owned=self._localnet_owned, fragments=self._fragments)
        if self._rebuild:
            self.nft.apply(delete_table(family=self.nft.family, table=self.nft.table))
            self._rebuild, self._table = False, None
        keep = frozenset(
            f"r_{slot}" for slot, digest in self._digests.items()
            if chain_digest(table.chains.get(f"r_{slot}", _NO_CHAIN)) == digest
        )
        self.nft.commit(transaction(self._table, table, known=self._known, keep=keep,
                                    family=self.nft.family, table=self.nft.table))
        self._table, self._known, self._digests = table, True, {}

    def _states(self) -> dict[ListenKey, RouteState]:
        states: dict[ListenKey, RouteState] = {}
        for identity, route in self._routes.items():
            verdict = self._verdicts.get(identity, Verdict(True))
            states[route.key] = RouteState(
                key=route.key, alias=route.spec.alias, slot=route.slot, mark=route.mark,
                families=route.families, uncovered=verdict.uncovered,
                client_address_hidden=route.masquerade, limit=route.limit,
                idle_timeout=route.idle_timeout, pool=route.spec.backends,
            )
        return states

    def routes(self) -> Mapping[ListenKey, RouteState]:
        """The routes the kernel forwards now."""
        with self._lock:
            return self._states()

    def counters(self) -> dict[ListenKey, RouteCounters]:
        """Every kernel route's counters, read now (one nft listing, one conntrack dump).
        `connections` and the rejections count flows (their first packet)."""
        with self._lock:
            routes = list(self._routes.values())
        counted = self.nft.counted(COUNTED_SETS)
        active = conntrack.active_by_slot()
        traffic, zero = counted.get("traffic", {}), (0, 0)

        def packets(set_name: str, mark: int) -> int:
            return counted.get(set_name, {}).get(str(mark), zero)[0]

        found: dict[ListenKey, RouteCounters] = {}
        for route in routes:
            mark = route.mark
            way_in = traffic.get(f"{mark} . original", zero)
            way_out = traffic.get(f"{mark} . reply", zero)
            found[route.key] = RouteCounters(
                connections=packets("flows", mark), active=active.get(route.slot, 0),
                packets_in=way_in[0], bytes_in=way_in[1],
                packets_out=way_out[0], bytes_out=way_out[1],
                rejected={"acl": packets("acl", mark), "limit": packets("lim", mark),
                          "no_backend": packets("nob", mark)},
            )
        return found

    def next_deadline(self) -> float | None:
        """When the next removed route's flows are due to be cut (clock time), if any."""
        with self._lock:
            return min((d.deadline for d in self._draining.values()), default=None)

    def draining_active(self) -> int:
        """Live flows of removed routes not cut yet (0: shutting down can stop waiting)."""
        with self._lock:
            slots = set(self._draining)
        return sum(n for slot, n in conntrack.active_by_slot().items() if slot in slots)

    def cut_expired(self, now: float | None = None) -> list[str]:
        """Cut the flows of removed routes whose deadline passed; their identities."""
        with self._lock:
            now = self.clock() if now is None else now
            due = [d for d in self._draining.values() if d.deadline <= now]
            for draining in due:
                conntrack.cut(draining.slot)
                del self._draining[draining.slot]
                logger.debug("kernel route %s: drain deadline, flows cut", draining.identity,
                            extra={"action": "kernel cut"})
            return [d.identity for d in due]

    def close(self, *, keep: bool = False) -> None:
        """Remove the table and cut labelproxy's flows; `keep` leaves both for a successor."""
        with self._lock:
            if keep:
                logger.info("kernel table left in place for the next run")
                return
            self.nft.apply(delete_table(family=self.nft.family, table=self.nft.table))
            conntrack.cut_all()
            if self._localnet_owned:
                host.set_route_localnet(False)
                self._localnet_owned = False
            self._table, self._routes, self._slots, self._draining = None, {}, {}, {}
            logger.info("kernel table removed", extra={"action": "kernel close"})

