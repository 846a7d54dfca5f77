"""The process lifecycle: startup -> serve -> shutdown, as named phases.

startup: probe nftables (`LABELPROXY_FORWARDING`, see `forwarding`), bind the HTTP endpoints,
adopt the kernel table a previous run left, start discovery (engine down is retried, not
fatal) and the routes-file watcher, apply the first snapshot (then /readyz says 200).
serve: every input change (a Docker snapshot, a routes-file reload, a listener lost, a bind
retry) wakes one reconcile loop, which builds the whole desired state and applies it to the
listeners and then to the kernel; inputs are coalesced, the latest wins. A backend whose
readiness changes (health checks, ejections) makes the kernel's pools follow at once, without
a whole pass (the relay's pools read the checker directly).
shutdown: the first SIGTERM/SIGINT stops accepting everywhere (listeners closed, kernel routes
taking no new flow) and drains live connections and forwarded flows until
`LABELPROXY_DRAIN_TIMEOUT`, then cancels what is left, removes the kernel table and exits 0; a
second signal exits at once (the kernel table stays, and the next start adopts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import resource
import signal
import time
from collections.abc import Callable

import anyio
import anyio.abc
import anyio.to_thread

from labelproxy import __version__, status
from labelproxy.forwarding import Forwarding, KernelUnavailableError
from labelproxy.health.checker import HealthChecker
from labelproxy.health.targets import health_targets
from labelproxy.health.views import StateChange
from labelproxy.http import HttpState, serve_http
from labelproxy.metrics import Metrics, MetricsDocument
from labelproxy.reconciler import Reconciler
from labelproxy.settings import Settings, split_host_port
from labelproxy.sources.containers import ContainerView, DiscoveryContext
from labelproxy.sources.desired import build_desired
from labelproxy.sources.discovery import Discovery, docker_host_problem
from labelproxy.sources.power import Power
from labelproxy.sources.sleeper import Sleeper
from labelproxy.sources.staticroutes import RoutesFileInput
from labelproxy.spec import Backend, DesiredState, ListenKey, Problem, RouteSpec
from labelproxy.streams.tcp import loop as tcp_loop

logger = logging.getLogger(__name__)

BIND_RETRY_INTERVAL = 5.0
FORCED_EXIT_STATUS = 1


class StartupError(Exception):
    """Start-up cannot go on (the HTTP address cannot be bound, the engine URL is unusable);
    the message is one line naming the setting and the value."""


class Runtime:
    """Holds the inputs (Docker snapshot, static routes) and drives the reconciler."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.metrics.build_info.labels(__version__).set(1)
        self.views: tuple[ContainerView, ...] = ()
        self.ctx = DiscoveryContext(label_prefix=settings.label_prefix)
        self.docker_seen = not settings.discovery_enabled
        self.docker_connected = False
        self.routes_file = RoutesFileInput(
            settings.routes_file, metrics=self.metrics, on_change=self.wake
        )
        self.applied_once = False
        self._problems_logged: set[Problem] = set()
        self._changed: anyio.Event | None = None
        self._stop_requested: anyio.Event | None = None
        self.reconciler: Reconciler | None = None
        self.edge = settings.edge_policy()
        self.forwarding = Forwarding(mode=settings.forwarding, policy=self.edge)
        # the default checks run on the TCP data loop: never a hand-over of the interpreter
        # lock between it and this loop for a check (health.tcpbatch)
        self.health = HealthChecker(check_loop=tcp_loop.shared)
        # wake on demand: sleep-enabled containers are started and stopped through the engine
        self.sleeper: Sleeper | None = None
        if settings.discovery_enabled:
            power = Power(docker_host=settings.docker_host)
            self.sleeper = Sleeper(power=power, health=self.health, metrics=self.metrics)
        self._routes: dict[ListenKey, RouteSpec] | None = None  # the last pass's routes
        self._pass_lock: anyio.Lock | None = None  # a pass, or a refresh of kernel pools
        self._pools_changed: anyio.Event | None = None

    # -- inputs --------------------------------------------------------------------------
    def wake(self) -> None:
        """Ask the reconcile loop for a pass (coalesced)."""
        if self._changed is not None:
            self._changed.set()

    def on_snapshot(self, views: tuple[ContainerView, ...], ctx: DiscoveryContext) -> None:
        self.views = views
        self.ctx = ctx
        self.docker_seen = True
        self.wake()

    def on_connected(self, connected: bool) -> None:
        self.docker_connected = connected

    def on_event(self, action: str) -> None:
        self.metrics.docker_events_total.labels(action).inc()

    # -- phases --------------------------------------------------------------------------
    def ready(self) -> bool:
        """/readyz: 200 from the first applied snapshot on (the engine listed once, or
        discovery off), and still 200 when the engine is lost later: what was known keeps
        being served. `engine_state` tells that case apart."""
        return self.applied_once

    def engine_state(self) -> str:
        if not self.settings.discovery_enabled:
            return "off"
        return "connected" if self.docker_connected else "disconnected"

    # -- what the endpoints show (snapshots taken on the event loop) ---------------------
    def inputs(self) -> status.Inputs:
        return status.Inputs(
            ready=self.ready(),
            docker_enabled=self.settings.discovery_enabled,
            docker_connected=self.docker_connected,
            containers=len(self.views),
            udp_max_sessions=self.settings.udp_max_sessions,
        )

    def routes_snapshot(self) -> status.RoutesSnapshot:
        return status.routes_snapshot(
            self.reconciler, self.inputs(), metrics=self.metrics, paths=self.forwarding,
            health=self.health.statuses(),
            wake=self.sleeper.describe() if self.sleeper is not None else None,
        )  # fmt: skip

    def metrics_snapshot(self) -> MetricsDocument:
        state = status.metrics_state(
            self.reconciler, self.inputs(), paths=self.forwarding, health=self.health.statuses()
        )
        return MetricsDocument(self.metrics, state)

    def stop(self) -> None:
        """Begin the shutdown phase, as the first SIGTERM does (stop accepting, drain)."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> int:
        """Run until a signal (or `stop`); returns the process exit status. Reports started
        once ready (the first snapshot applied), for `task_group.start`."""
        host, port = split_host_port(self.settings.http_addr)
        self._changed = anyio.Event()
        self._stop_requested = anyio.Event()
        self._pass_lock, self._pools_changed = anyio.Lock(), anyio.Event()
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._watch_signals)
            state = HttpState(
                ready=self.ready, routes=self.routes_snapshot, metrics=self.metrics_snapshot,
                engine=self.engine_state,
            )  # fmt: skip
            try:
                await outer.start(
                    functools.partial(serve_http, host=host, port=port, state=state)
                )
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise StartupError(
                    f"cannot listen on LABELPROXY_HTTP_ADDR={self.settings.http_addr!r}: {reason}"
                ) from None
            try:
                await self.forwarding.start()
            except KernelUnavailableError as exc:
                raise StartupError(str(exc)) from None
            # before the listeners: a route's pool is its ready backends from the start
            await outer.start(self.health.serve)
            if self.forwarding.engine is not None:  # the kernel's pools follow readiness
                self.health.subscribe(self._health_listener(asyncio.get_running_loop()))
            async with anyio.create_task_group() as listeners:
                self.reconciler = Reconciler(
                    metrics=self.metrics,
                    edge=self.edge,
                    task_group=listeners,
                    on_listener_lost=self.wake,
                    health=self.health,
                )
                self.reconciler.shared.waker = self.sleeper
                # a check does not dial labelproxy's own listeners (a loop), as the relay does not
                self.health.own = self.reconciler.shared.own.lookup
                self.metrics.set_kernel_reader(self.forwarding.read_counters)
                async with anyio.create_task_group() as inputs:
                    inputs.start_soon(self._cancel_on_stop, inputs.cancel_scope)
                    inputs.start_soon(self._retry_binds)
                    inputs.start_soon(self.forwarding.serve)
                    inputs.start_soon(self._refresh_kernel_pools)
                    self.routes_file.load()
                    inputs.start_soon(self.routes_file.watch)
                    if self.sleeper is not None:
                        await inputs.start(self.sleeper.serve)
                    if self.settings.discovery_enabled:
                        discovery = Discovery(
                            docker_host=self.settings.docker_host,
                            label_prefix=self.settings.label_prefix,
                            resync_interval=self.settings.resync_interval,
                            on_snapshot=self.on_snapshot,
                            on_connected=self.on_connected,
                            on_event=self.on_event,
                        )
                        await inputs.start(discovery.serve)
                    self.wake()
                    await self._reconcile_loop(task_status)
                # inputs cancelled: shutdown phase
                logger.info(
                    "shutting down: listeners closed, draining connections for up to %.0fs",
                    self.settings.drain_timeout,
                    extra={"action": "shutdown"},
                )
                drain = self.settings.drain_timeout
                async with anyio.create_task_group() as draining:
                    draining.start_soon(functools.partial(
                        self.reconciler.close_all, drain_timeout=drain))
                    draining.start_soon(functools.partial(
                        self.forwarding.shutdown, drain_timeout=drain))
                listeners.cancel_scope.cancel()
            outer.cancel_scope.cancel()
        logger.info("stopped", extra={"action": "exit"})
        return 0

    async def _reconcile_loop(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        assert self.reconciler is not None
        while True:
            assert self._changed is not None
            await self._changed.wait()
            self._changed = anyio.Event()
            # pure, on frozen inputs: a container with a 5,000-port range takes a few hundred
            # ms to turn into specs, time the event loop (UDP relays, events) keeps running
            desired = await anyio.to_thread.run_sync(functools.partial(
                build_desired, self.views, self.ctx,
                static=self.routes_file.static.specs,
                static_problems=self.routes_file.static.problems,
            ))  # fmt: skip
            self._log_problem_changes(desired.problems)
            assert self._pass_lock is not None
            async with self._pass_lock:
                await self._apply(desired)
            if not self.applied_once and self.docker_seen:
                self.applied_once = True
                # what startup built (modules, settings, clients) lives as long as the
                # process: keep it out of the collector's full passes, which then only
                # visit what was allocated since (no pause that grows with the imports)
                gc.freeze()
                logger.info(
                    "ready: first snapshot applied (%d routes)",
                    len(desired.routes),
                    extra={"action": "ready"},
                )
                task_status.started()

    async def _apply(self, desired: DesiredState) -> None:
        """One pass: health targets, kernel withdrawals, listeners, then the kernel."""
        assert self.reconciler is not None
        began = time.monotonic()
        # every route (passive ejection needs the unchecked ones too), before the
        # listeners get the new specs: a new backend enters a pool only once ready
        self.health.set_targets(health_targets(desired.routes))  # a range checked once
        if self.docker_seen:  # before that, an adopted table keeps forwarding as it did
            await self.forwarding.withdraw(desired.routes)  # stop before start
        await self.reconciler.apply(desired)
        if self.sleeper is not None:
            self.sleeper.observe(desired.routes)
        if self.docker_seen:
            self._routes = dict(desired.routes)
            await self.forwarding.apply(desired.routes, bound=self.reconciler.live,
                                        ready=self._backend_ready)
        logger.debug(
            "reconciled %d routes in %.1f ms",
            len(desired.routes),
            (time.monotonic() - began) * 1000,
        )

    def _backend_ready(self, key: ListenKey, backend: Backend) -> bool:
        """A kernel pool's member: ready as the relay's pools see it."""
        return self.health.is_ready(key, backend) or not self.health.tracks(key)

    def _health_listener(
        self, aloop: asyncio.AbstractEventLoop
    ) -> Callable[[StateChange], None]:
        def listener(change: StateChange) -> None:  # on the thread of the change
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                aloop.call_soon_threadsafe(self._on_health_change, change)

        return listener

    def _on_health_change(self, change: StateChange) -> None:
        """On the event loop: a backend's readiness changed; the kernel's pools follow."""
        if self._pools_changed is not None:
            self._pools_changed.set()

    async def _refresh_kernel_pools(self) -> None:
        """Until cancelled: give the kernel the last pass's routes again, with the pools
        readiness makes of them now, when it changed (coalesced; never within a pass)."""
        while True:
            assert self._pools_changed is not None and self._pass_lock is not None
            await self._pools_changed.wait()
            self._pools_changed = anyio.Event()
            async with self._pass_lock:
                if self._routes is not None and self.reconciler is not None:
                    await self.forwarding.apply(self._routes, bound=self.reconciler.live,
                                                ready=self._backend_ready)

    def _log_problem_changes(self, problems: tuple[Problem, ...]) -> None:
        """Log each problem once when it appears and once when it is gone (not every pass)."""
        current = set(problems)
        for problem in sorted(current - self._problems_logged, key=str):
            if problem.source != str(self.settings.routes_file):  # logged when the file loads
                logger.error(
                    "route problem (%s): %s", problem.kind, problem,
                    extra={"route": problem.route, "container": problem.source,
                           "action": problem.kind},
                )  # fmt: skip
        for problem in sorted(self._problems_logged - current, key=str):
            logger.info(
                "route problem resolved: %s", problem,
                extra={"route": problem.route, "container": problem.source, "action": "resolved"},
            )  # fmt: skip
        self._problems_logged = current

    async def _retry_binds(self) -> None:
        """A route whose bind failed is planned again every few seconds until it binds."""
        while True:
            await anyio.sleep(BIND_RETRY_INTERVAL)
            binds = self.reconciler is not None and self.reconciler.bind_problems
            if binds or self.forwarding.failed:  # failed: the kernel refused the last change
                self.wake()

    async def _cancel_on_stop(self, scope: anyio.CancelScope) -> None:
        assert self._stop_requested is not None
        await self._stop_requested.wait()
        scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            stopping = False
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.routes_file.on_sighup()
                    self.wake()
                elif not stopping:
                    stopping = True
                    logger.info(
                        "%s: stopping (send it again to exit at once)",
                        signal.Signals(signum).name,
                        extra={"action": "shutdown"},
                    )
                    self.stop()
                else:
                    logger.warning("second signal: exiting now", extra={"action": "exit"})
                    logging.shutdown()
                    os._exit(FORCED_EXIT_STATUS)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one: every connection holds two sockets
    (and a pipe pair while data flows), every UDP session one socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-files limit from %d: %s", soft, exc)
    return soft


def run(settings: Settings) -> int:
    """Blocking entry point: anyio on asyncio with uvloop when available. Raises
    `StartupError` when start-up cannot go on."""
    if settings.discovery_enabled:
        problem = docker_host_problem(settings.docker_host)
        if problem is not None:
            raise StartupError(
                f"invalid setting LABELPROXY_DOCKER_HOST={settings.docker_host!r}: {problem}"
            )
    limit = raise_fd_limit()
    logger.info("labelproxy %s starting (open files limit %d)", __version__, limit,
                extra={"action": "start"})
    runtime = Runtime(settings)
    try:
        runtime.forwarding.probe()
    except KernelUnavailableError as exc:
        raise StartupError(str(exc)) from None
    options: dict[str, object] = {}
    try:
        import uvloop  # noqa: F401, PLC0415

        options["use_uvloop"] = True
    except ImportError:  # pragma: no cover - non-Linux
        pass
    try:
        return anyio.run(runtime.serve, backend="asyncio", backend_options=options)
    except BaseExceptionGroup as group:  # task groups wrap what they raise
        found = group.subgroup(StartupError)
        if found is None or len(found.exceptions) != len(group.exceptions):
            raise
        raise _first_leaf(found) from None


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
