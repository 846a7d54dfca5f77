"""Kernel or relay, per route: the runtime's side of `labelproxy.kernel`.

`Forwarding` decides, for every route, whether nftables forwards it (`kernel`) or the relay
does, and says why (`RoutePath`, shown on /routes, in `labelproxy routes`, in
`route_info{forwarding}` and logged once per change). It owns the `KernelEngine` and calls it
only from worker threads (every engine call is blocking), one call at a time:

    forwarding = Forwarding(mode=settings.forwarding, policy=edge)
    forwarding.probe()                  # before the event loop: `kernel` mode fails start-up
    await forwarding.start()            # adopts the table a previous run left (cuts nothing)
    await forwarding.withdraw(desired)  # each pass, before listeners stop: removed routes
    await forwarding.apply(desired, bound=reconciler.live,   # after the listeners: all,
                           ready=health.is_ready)        # pools of their ready backends
    forwarding.read_counters(listens)   # at scrape time, on the exposition's worker thread
    await forwarding.serve()            # cuts the flows of removed routes at their deadline
    await forwarding.shutdown(drain_timeout=...)   # stop, drain, remove the table

Every route keeps the listen socket labelproxy binds for it and its relay listener, exactly
as without the kernel: bind conflicts are reported as before, and what the kernel does not
carry (the other address family of a dual-stack route, or everything while the engine is
unavailable) reaches the relay. A route whose socket is not bound is never given to the
kernel: its port may be someone else's. `LABELPROXY_FORWARDING`: `relay` never builds an
engine; `auto` uses it when `probe()` says nftables is usable here (else every route is on the
relay, with the reason, logged once); `kernel` stops start-up when it is not.

A kernel route's pool is its backends that `ready(key, backend)` says are ready (the health
checker's view: active checks, Docker health, passive ejections), as the relay's pool is; with
none ready the kernel rejects its new flows (`no_backend`). The runtime applies again when a
backend's readiness changes, so a backend that fails its check leaves the `numgen` map and
returns once it passes (established flows keep going: conntrack holds their translation).

The kernel's table is applied only once the Docker engine has been listed (the runtime calls
`apply` from then on): until then an adopted table goes on forwarding what it forwarded, so a
restart does not cut or refuse the flows of routes that have not been rediscovered yet.
"""

from __future__ import annotations

import functools
import logging
import resource
import time
from collections.abc import Callable, Collection, Container, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from labelproxy.routelog import log_runs
from labelproxy.routepath import NOT_BOUND, RoutePath, kernel_path, with_kernel_counters
from labelproxy.spec import Backend, EdgePolicy, ForwardingMode, ListenKey, RouteSpec

if TYPE_CHECKING:  # the engine (and pyroute2, ~20 MB) is loaded only when it is used
    from labelproxy.kernel.engine import ApplyResult, KernelEngine, RouteCounters

logger = logging.getLogger(__name__)

Ready = Callable[[ListenKey, Backend], bool]

CUT_RETRY = 5.0  # after a failed conntrack cut
ROUTES_COUNTERS_AGE = 1.0  # /routes asks for a fresh kernel reading when its own is older
DRAIN_POLL = 0.25  # shutdown: how often the remaining forwarded flows are counted


class KernelUnavailableError(Exception):
    """`LABELPROXY_FORWARDING=kernel` and nftables cannot be used here (one line)."""


def _timed_apply(engine: KernelEngine, specs: list[RouteSpec],
                 ready: Ready | None) -> tuple[ApplyResult, float]:
    """`engine.apply(specs, ready=ready)` and the CPU it took (this thread's and the `nft`
    it ran)."""
    began = time.thread_time() + _children_cpu()
    result = engine.apply(specs, ready=ready)
    return result, time.thread_time() + _children_cpu() - began


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Forwarding:
    """See the module docstring."""

    def __init__(self, *, mode: ForwardingMode, policy: EdgePolicy,
                 engine: KernelEngine | None = None) -> None:
        self.mode = mode
        self.engine: KernelEngine | None = None
        self.unavailable = "LABELPROXY_FORWARDING=relay"
        if mode != "relay":
            if engine is None:
                from labelproxy.kernel.engine import KernelEngine  # noqa: PLC0415

                engine = KernelEngine(policy=policy)
            self.engine = engine
            self.unavailable = ""
        self.failed = ""  # the last apply's error, until one succeeds
        self._paths: dict[ListenKey, RoutePath] = {}
        self._given: dict[ListenKey, RouteSpec] = {}  # the routes the kernel forwards now
        self._ready: Ready | None = None  # the readiness the last `apply` was given
        self._logged: dict[ListenKey, str] = {}  # what the log last said of each route
        # made on the event loop (`start`): set when the drain deadlines may have changed
        self._deadlines_changed: anyio.Event | None = None
        self._lock: anyio.Lock | None = None  # one engine call at a time from the loop
        self._refresh: anyio.Event | None = None  # /routes wants fresher kernel counters
        # the last kernel reading (listen key text -> counters) and when it was taken
        self._counters: dict[str, RouteCounters] = {}
        self._counters_at = 0.0

    # -- start-up ------------------------------------------------------------------------
    def probe(self) -> None:
        """Blocking, before the event loop. `kernel` mode: raise `KernelUnavailableError` when
        nftables cannot be programmed here; `auto`: fall back to the relay, logged once."""
        if self.engine is None:
            logger.info("forwarding: every route on the relay (LABELPROXY_FORWARDING=relay)",
                        extra={"action": "forwarding"})
            return
        reason = self.engine.probe()
        if reason is None:
            logger.info("forwarding: nftables usable here; routes the kernel can carry are "
                        "forwarded by it (LABELPROXY_FORWARDING=%s)", self.mode,
                        extra={"action": "forwarding"})
            return
        self._disable(f"nftables unavailable: {reason}")

    def _disable(self, reason: str) -> None:
        if self.mode == "kernel":
            raise KernelUnavailableError(f"LABELPROXY_FORWARDING=kernel, but {reason}")
        self.engine, self.unavailable = None, reason
        logger.warning("forwarding: every route on the relay: %s (LABELPROXY_FORWARDING=auto; "
                       "grant CAP_NET_ADMIN for the kernel path)", reason,
                       extra={"action": "forwarding"})

    async def start(self) -> None:
        """Adopt (or rebuild) the table a previous run left; nothing changes until `apply`."""
        self._deadlines_changed, self._lock = anyio.Event(), anyio.Lock()
        self._refresh = anyio.Event()
        if self.engine is None:
            return
        try:
            await anyio.to_thread.run_sync(self.engine.start)
        except Exception as exc:  # nft or conntrack refused: as unusable as a failed probe
            self._disable(f"cannot read labelproxy's nftables table: {exc}")

    # -- each pass -----------------------------------------------------------------------
    async def withdraw(self, desired: Mapping[ListenKey, RouteSpec]) -> None:
        """Before the listeners of a pass are stopped: the kernel stops taking new flows for
        the routes that are no longer desired (their established flows drain), so no flow is
        forwarded for a port labelproxy no longer holds. The other routes stay as they are
        (a changed route keeps its old version until `apply`). Nothing to withdraw: no-op."""
        engine = self.engine
        keep = [spec for key, spec in self._given.items() if key in desired]
        if engine is None or self._lock is None or len(keep) == len(self._given):
            return
        async with self._lock:
            try:
                result = await anyio.to_thread.run_sync(
                    functools.partial(engine.apply, keep, ready=self._ready))
            except Exception as exc:  # `apply` after the listeners tries again
                logger.debug("kernel forwarding: withdrawing removed routes failed: %s", exc)
                return
        self._given = {key: spec for key, spec in self._given.items() if key in result.routes}
        if self._deadlines_changed is not None:
            self._deadlines_changed.set()

    async def apply(self, desired: Mapping[ListenKey, RouteSpec],
                    *, bound: Container[ListenKey], ready: Ready | None = None) -> None:
        """Give the kernel every route it may carry (one transaction), each with the
        backends `ready` accepts (all without it), note each route's path and log the
        changes. A refused transaction leaves the kernel as it was: `failed` says why, and
        the runtime retries on a later pass."""
        engine = self.engine
        paths: dict[ListenKey, RoutePath] = {}
        if engine is None:
            relay = RoutePath("relay", self.unavailable)
            paths = dict.fromkeys(desired, relay)
        else:
            candidates = [spec for key, spec in desired.items() if key in bound]
            self._ready = ready
            assert self._lock is not None and self._deadlines_changed is not None, "start first"
            began = time.monotonic()
            async with self._lock:
                try:
                    result, cpu = await anyio.to_thread.run_sync(_timed_apply, engine,
                                                                 candidates, ready)
                except Exception as exc:
                    self._apply_failed(exc, desired)
                    return
            logger.debug("kernel: %d routes forwarded, %d refused, applied in %.1f ms "
                         "(CPU %.1f ms)", len(result.routes), len(result.refused),
                         (time.monotonic() - began) * 1000, cpu * 1000)
            if self.failed:
                logger.info("kernel forwarding: the table is up to date again",
                            extra={"action": "forwarding"})
            self.failed = ""
            self._given = {spec.key: spec for spec in candidates if spec.key in result.routes}
            for key in desired:
                state = result.routes.get(key)
                if state is not None:
                    paths[key] = kernel_path(state)
                else:
                    paths[key] = RoutePath("relay", result.refused.get(key, NOT_BOUND))
            self._deadlines_changed.set()
        self._paths = paths
        self._log_changes(desired)

    def _apply_failed(self, exc: Exception, desired: Mapping[ListenKey, RouteSpec]) -> None:
        message = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
        if message != self.failed:
            logger.error("kernel forwarding: the table could not be changed: %s (retrying; "
                         "it forwards what it forwarded before)", message,
                         extra={"action": "forwarding"})
        self.failed = message
        note = f"the kernel refused the last change ({message}); retrying"
        paths: dict[ListenKey, RoutePath] = {}
        for key in desired:
            old = self._paths.get(key)
            if old is not None and old.forwarding == "kernel":
                paths[key] = RoutePath("kernel", note, old.client_address_hidden,
                                       old.families, old.uncovered, old.mark, old.pool)
            else:
                paths[key] = RoutePath("relay", note)
        self._paths = paths

    def _log_changes(self, desired: Mapping[ListenKey, RouteSpec]) -> None:
        """One INFO line per route (or run of ports) whose path changed; none while the
        engine is off (said once at start)."""
        changed: dict[str, list[RouteSpec]] = {}
        logged: dict[ListenKey, str] = {}
        for key, path in self._paths.items():
            logged[key] = line = path.describe()
            if self._logged.get(key) != line:
                changed.setdefault(line, []).append(desired[key])
        self._logged = logged
        if self.engine is None:
            return
        for line, specs in changed.items():
            log_runs(line, specs, action="forwarding")

    def path(self, key: ListenKey) -> RoutePath:
        """The path of the route on `key` (relay, with why, before the first pass)."""
        found = self._paths.get(key)
        if found is not None:
            return found
        return RoutePath("relay", self.unavailable or "not applied to the kernel yet")

    def path_of(self, key: ListenKey) -> str:
        """`kernel` or `relay`: the path of the route on `key` (as `status` reads it)."""
        return self.path(key).forwarding

    def kernel_keys(self) -> frozenset[ListenKey]:
        return frozenset(k for k, p in self._paths.items() if p.forwarding == "kernel")

    # -- scrapes ---------------------------------------------------------------------------
    def read_counters(self, listens: Collection[str]) -> dict[str, RouteCounters]:
        """Blocking (one nft listing, one conntrack dump): the kernel's counters of the
        routes on `listens` (listen keys as text). For the metrics' worker thread."""
        engine = self.engine
        if engine is None:
            return {}
        read = {str(key): c for key, c in engine.counters().items()}
        self._counters, self._counters_at = read, time.monotonic()
        wanted = set(listens)
        return {text: c for text, c in read.items() if text in wanted}

    def route_document(self, key: ListenKey, counters: Mapping[str, Any]) -> dict[str, Any]:
        """A route's forwarding fields on /routes; for a kernel route also its `counters`
        with the kernel's share added (from the last reading: /routes is written on the
        event loop and cannot wait for nftables; a reading older than a second is renewed
        in the background, and `kernel_counters_age` says how old the one shown is)."""
        path = self.path(key)
        doc = path.document()
        if path.forwarding != "kernel":
            return doc
        age = time.monotonic() - self._counters_at
        if age > ROUTES_COUNTERS_AGE and self._refresh is not None:
            self._refresh.set()
        k = self._counters.get(str(key))
        if k is None:
            return doc
        doc["counters"] = with_kernel_counters(counters, k, udp=key.transport == "udp",
                                               age=age)
        return doc

    # -- background: drain deadlines, /routes counters ----------------------------------------
    async def serve(self) -> None:
        """Until cancelled: cut the flows of each removed route at its drain deadline, and
        renew the kernel reading /routes shows when it asks."""
        if self.engine is None:
            return
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._serve_deadlines)
            tasks.start_soon(self._serve_refresh)

    async def _serve_refresh(self) -> None:
        while True:
            assert self._refresh is not None, "start first"
            await self._refresh.wait()
            self._refresh = anyio.Event()
            try:
                await anyio.to_thread.run_sync(self.read_counters, ())
            except Exception as exc:
                logger.debug("cannot read the kernel's counters for /routes: %s", exc)
                await anyio.sleep(ROUTES_COUNTERS_AGE)

    async def _serve_deadlines(self) -> None:
        engine = self.engine
        if engine is None:
            return
        assert self._lock is not None, "start first"
        while True:
            self._deadlines_changed = anyio.Event()
            deadline = await anyio.to_thread.run_sync(engine.next_deadline)
            if deadline is None:
                await self._deadlines_changed.wait()
                continue
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                await self._deadlines_changed.wait()
                continue
            try:
                async with self._lock:
                    cut = await anyio.to_thread.run_sync(engine.cut_expired)
                if cut:
                    logger.info("kernel forwarding: drain deadline of %d removed routes: their "
                                "remaining flows cut", len(cut), extra={"action": "kernel cut"})
            except Exception as exc:
                logger.error("kernel forwarding: cannot cut drained flows: %s (retrying)", exc,
                             extra={"action": "kernel cut"})
                await anyio.sleep(CUT_RETRY)

    # -- shutdown --------------------------------------------------------------------------
    async def shutdown(self, *, drain_timeout: float) -> None:
        """Stop forwarding new flows, let established ones finish until `drain_timeout`,
        then remove the table (cutting what is left)."""
        engine = self.engine
        if engine is None or self._lock is None:
            return
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    await anyio.to_thread.run_sync(engine.apply, [])
                except Exception as exc:
                    logger.error("kernel forwarding: cannot stop the routes: %s", exc,
                                 extra={"action": "shutdown"})
                deadline = time.monotonic() + drain_timeout
                left = await self._draining(engine)
                while left and time.monotonic() < deadline:
                    await anyio.sleep(min(DRAIN_POLL, max(0.0, deadline - time.monotonic())))
                    left = await self._draining(engine)
                if left:
                    logger.info("kernel forwarding: drain deadline, cutting %d flows", left,
                                extra={"action": "shutdown"})
                try:
                    await anyio.to_thread.run_sync(engine.close)
                except Exception as exc:
                    logger.error("kernel forwarding: cannot remove the table: %s", exc,
                                 extra={"action": "shutdown"})
            self._paths = {}

    @staticmethod
    async def _draining(engine: KernelEngine) -> int:
        try:
            return await anyio.to_thread.run_sync(engine.draining_active)
        except Exception as exc:
            logger.error("kernel forwarding: cannot count the draining flows: %s", exc,
                         extra={"action": "shutdown"})
            return 0
