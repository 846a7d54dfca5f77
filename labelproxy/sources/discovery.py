"""Docker discovery: the only module that imports `docker`.

Level-triggered: on each connection it subscribes to the engine's events first, then lists the
running containers and publishes the whole list as `ContainerView`s (`on_snapshot`). Any
relevant event, and a timer every `resync_interval`, triggers another full list (coalesced and
throttled: a burst of events gives few lists, the latest state wins). Views are built from the
list itself (one request however many containers); a container is inspected only when the list
cannot describe it exactly, once (`dockerviews.needing_details`).

Liveness: an engine that stops answering (frozen, overloaded, a dead TCP peer) keeps its event
stream open and silent, so the stream alone cannot tell. The engine is pinged (`GET /_ping`)
before each connection and every `PING_INTERVAL` while connected; no answer within
`PING_DEADLINE` counts as a disconnect. When the event stream ends, a call fails or a ping is
missed, it reports `on_connected(False)` and reconnects with exponential backoff (0.1 s doubling
up to 5 s), then lists again.

docker-py is blocking: its calls run on daemon threads (`blocking.run_blocking`), which talk to
the event loop only through `anyio.from_thread`; a call stuck on a frozen engine is abandoned,
never awaited, and cannot hold up shutdown. Cancelling `serve` closes the event stream, which
ends that thread. The JSON -> view conversion (`dockerviews`) is pure and usable without an engine.

About 370 lines, on purpose: every docker-py call of the process is here (the one module that
imports `docker`, an import-linter contract), the long-lived watch and the one-shot
`list_once` of `labelproxy check` alike; what needs no engine is already out (`dockerviews`,
`liveness`, `blocking`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import docker
import docker.errors
import requests.exceptions

from labelproxy.sources import liveness
from labelproxy.sources.blocking import run_blocking
from labelproxy.sources.containers import ContainerView, DiscoveryContext
from labelproxy.sources.dockerviews import (
    InspectDetails,
    daemon_host_of,
    details_from_attrs,
    needing_details,
    own_networks,
    read_own_hints,
    view_from_summary,
)
from labelproxy.sources.labels import LabelFacts

logger = logging.getLogger(__name__)

CONTAINER_ACTIONS = (
    "create",  # a sleep-enabled container created and not started is asleep: its routes bind
    "start", "die", "stop", "kill", "destroy", "pause", "unpause", "rename", "health_status",
)  # fmt: skip
NETWORK_ACTIONS = ("connect", "disconnect")  # a container joined or left a network
EVENT_FILTERS = {"type": ["container", "network"], "event": [*CONTAINER_ACTIONS, *NETWORK_ACTIONS]}
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
RELIST_THROTTLE = 0.05  # at most one list per 50 ms; events in between are coalesced
SETTLE_DELAY = 0.5  # one more list this long after the last event
PING_INTERVAL = 5.0  # how often a connected engine is asked whether it still answers
PING_DEADLINE = 3.0  # an engine that does not answer a ping within this is disconnected
CHECK_API_VERSION = "1.24"  # any fixed version: the client then asks the engine nothing
DOCKER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


@dataclass(slots=True)
class ListMemo:
    """What discovery remembers per running container between lists (all fixed per container):
    inspected details, and the label facts that decide whether to inspect."""

    details: dict[str, InspectDetails] = field(default_factory=dict)
    facts: dict[str, LabelFacts] = field(default_factory=dict)


def list_running(
    client: Any, known: ListMemo, *, label_prefix: str
) -> tuple[tuple[ContainerView, ...], ListMemo]:
    """Worker thread: list the running containers (and the sleep-enabled ones that are not:
    asleep) and build their views from the list alone;
    inspect only the few the list cannot describe exactly (`needing_details`), once each."""
    summaries: dict[str, Mapping[str, Any]] = {}
    views: dict[str, ContainerView] = {}
    fresh = ListMemo()
    details = fresh.details
    listed = list(client.api.containers(filters={"status": "running"}))
    # sleep-enabled containers that are stopped or paused: their routes stay bound, asleep
    # (by ID, whatever their state now: one woken between the two calls is in neither
    # list's "running" view and would look gone, its route torn down under held clients)
    asleep = client.api.containers(all=True, filters={"label": f"{label_prefix}.idle_timeout"})
    running = {s.get("Id") for s in listed}
    listed += [s for s in asleep if s.get("Id") not in running]
    for summary in listed:
        cid = str(summary.get("Id"))
        summaries[cid] = summary
        if cid in known.details:
            details[cid] = known.details[cid]
        if cid in known.facts:
            fresh.facts[cid] = known.facts[cid]
        _add_view(views, summary, details.get(cid))
    need = needing_details(
        views.values(), label_prefix=label_prefix, known=details, memo=fresh.facts
    )
    for cid in sorted(need):
        try:
            attrs = client.api.inspect_container(cid)
            details[cid] = details_from_attrs(attrs)
        except docker.errors.NotFound:
            del views[cid]  # gone between list and inspect
            continue
        _add_view(views, summaries[cid], details[cid])
    ordered = sorted(views.values(), key=lambda v: (v.created, v.id))
    return tuple(ordered), fresh


def _add_view(
    views: dict[str, ContainerView], summary: Mapping[str, Any], details: InspectDetails | None
) -> None:
    try:
        view = view_from_summary(summary, details=details)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        name = ",".join(summary.get("Names") or ()).lstrip("/") or str(summary.get("Id"))
        logger.error("container %s skipped: unreadable list data (%r)", name, exc,
                     extra={"container": name, "action": "list"})  # fmt: skip
        return
    views[view.id] = view


@dataclass(slots=True)
class _Session:
    """State of one connection to the engine, shared by its tasks on the event loop."""

    dirty: anyio.Event = field(default_factory=anyio.Event)
    lost: str = ""


class Discovery:
    """Watches one Docker engine and publishes the running containers (see the module doc)."""

    def __init__(
        self,
        *,
        docker_host: str,
        label_prefix: str,
        resync_interval: float,
        on_snapshot: Callable[[tuple[ContainerView, ...], DiscoveryContext], None],
        on_connected: Callable[[bool], None],
        on_event: Callable[[str], None],
        api_timeout: float = 15.0,
        ping_interval: float = PING_INTERVAL,
        ping_deadline: float = PING_DEADLINE,
    ) -> None:
        self._docker_host = docker_host
        self._label_prefix = label_prefix
        self._resync_interval = resync_interval
        self._on_snapshot = on_snapshot
        self._on_connected = on_connected
        self._on_event = on_event
        self._api_timeout = api_timeout
        self._ping_interval = ping_interval
        self._ping_deadline = ping_deadline
        self._connected: bool | None = None
        self._known = ListMemo()
        self._published: dict[str, ContainerView] = {}
        self._hints: frozenset[str] = frozenset()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch the engine until cancelled; an unreachable engine is retried, never fatal."""
        task_status.started()
        self._hints = await run_blocking(read_own_hints)
        delay, last_error = BACKOFF_MIN, ""
        while True:
            try:
                reason = await self._serve_connection()
            except (*DOCKER_ERRORS, liveness.EngineUnresponsiveError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a bug must not end discovery: log it and reconnect
                logger.exception("discovery failed", extra={"action": "disconnect"})
                reason = f"{type(exc).__name__}: {exc}"
            if self._connected:
                delay, last_error = BACKOFF_MIN, ""
            self._set_connected(False, reason)
            if reason != last_error:
                logger.error(
                    "Docker engine at %s unavailable (%s); retrying with backoff",
                    self._docker_host, reason, extra={"action": "disconnect"},
                )  # fmt: skip
            last_error = reason
            logger.debug("reconnecting to %s in %.1fs", self._docker_host, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _serve_connection(self) -> str:
        """One connection: ping, subscribe, list, then re-list on events and on the timer
        until lost (the stream ends, a call fails, or a ping goes unanswered)."""
        probe: Any = None
        client: Any = None
        stream: Any = None
        try:
            probe = docker.APIClient(
                base_url=self._docker_host, version=CHECK_API_VERSION, timeout=self._ping_deadline
            )
            await liveness.ping(probe, deadline=self._ping_deadline)
            client = await run_blocking(self._connect, name="labelproxy-docker")
            stream = await run_blocking(
                lambda: client.api.events(decode=True, filters=EVENT_FILTERS),
                name="labelproxy-docker",
            )
            session = _Session()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._follow_events, stream, session, tg.cancel_scope)
                tg.start_soon(self._watch_liveness, probe, session, tg.cancel_scope)
                if await self._publish(client, session, tg.cancel_scope):
                    self._set_connected(True, f"API {client.api.api_version}")
                    await self._relist_forever(client, session, tg.cancel_scope)
            return session.lost or "connection ended"
        finally:
            _close_quietly(stream)
            _close_quietly(client)
            _close_quietly(probe)

    def _connect(self) -> Any:
        return docker.DockerClient(base_url=self._docker_host, timeout=self._api_timeout)

    async def _watch_liveness(
        self, probe: Any, session: _Session, scope: anyio.CancelScope
    ) -> None:
        """A missed ping deadline (or a failed ping) ends the session."""

        def lost(reason: str) -> None:
            session.lost = session.lost or reason
            scope.cancel()

        await liveness.watch(probe, interval=self._ping_interval, deadline=self._ping_deadline,
                             errors=DOCKER_ERRORS, on_lost=lost)  # fmt: skip

    async def _follow_events(
        self, stream: Any, session: _Session, scope: anyio.CancelScope
    ) -> None:
        token = anyio.lowlevel.current_token()
        try:
            await run_blocking(self._pump_events, stream, session, token,
                               name="labelproxy-docker-events")  # fmt: skip
            session.lost = session.lost or "event stream ended"
        except Exception as exc:  # whatever broke the stream, the cure is to reconnect
            session.lost = f"event stream failed: {type(exc).__name__}: {exc}"
        scope.cancel()

    def _pump_events(
        self, stream: Any, session: _Session, token: anyio.lowlevel.EventLoopToken
    ) -> None:
        """Worker thread: read events until the stream ends; hand each to the event loop."""
        for event in stream:
            action = str(event.get("Action") or event.get("status") or "").split(":", 1)[0]
            try:
                anyio.from_thread.run_sync(self._note_event, action, session, token=token)
            except RuntimeError:  # the event loop is gone: we are shutting down
                return

    def _note_event(self, action: str, session: _Session) -> None:
        self._on_event(action)
        session.dirty.set()

    async def _relist_forever(
        self, client: Any, session: _Session, scope: anyio.CancelScope
    ) -> None:
        """Re-list on events (then once more after SETTLE_DELAY: Docker sends some events, such
        as network connect, just before the change shows in its list) and on the resync timer.
        The first list of a connection is followed by one more after SETTLE_DELAY too: an
        engine that was busy or frozen may apply a change (a container that exited meanwhile)
        just as the subscription opens, its event then sent before the stream was listening."""
        settle_at: float | None = anyio.current_time() + SETTLE_DELAY
        while True:
            wait = self._resync_interval if settle_at is None else settle_at - anyio.current_time()
            with anyio.move_on_after(max(wait, 0.0)):
                await session.dirty.wait()
            event = session.dirty.is_set()
            settle_at = anyio.current_time() + SETTLE_DELAY if event else None
            session.dirty = anyio.Event()
            if not await self._publish(client, session, scope):
                return
            await anyio.sleep(RELIST_THROTTLE)

    async def _publish(self, client: Any, session: _Session, scope: anyio.CancelScope) -> bool:
        """List and hand the whole snapshot over; on failure mark the session lost."""
        prefix = self._label_prefix
        try:
            views, self._known = await run_blocking(
                lambda: list_running(client, self._known, label_prefix=prefix),
                name="labelproxy-docker",
            )
        except DOCKER_ERRORS as exc:
            session.lost = f"listing containers failed: {type(exc).__name__}: {exc}"
            scope.cancel()
            return False
        self._log_changes(views)
        context = DiscoveryContext(
            label_prefix=self._label_prefix,
            own_networks=own_networks(views, self._hints),
            daemon_host=daemon_host_of(self._docker_host),
        )
        self._on_snapshot(views, context)
        return True

    def _log_changes(self, views: tuple[ContainerView, ...]) -> None:
        current = {v.id: v for v in views}
        seen = [v for cid, v in current.items() if cid not in self._published]
        gone = [v for cid, v in self._published.items() if cid not in current]
        for action, changed in (("seen", seen), ("gone", gone)):
            for view in changed:
                logger.info("container %s: %s", action, view.name,
                            extra={"container": view.name, "action": action})  # fmt: skip
        self._published = current

    def _set_connected(self, connected: bool, detail: str) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if connected:
            logger.info("connected to the Docker engine at %s (%s)", self._docker_host, detail,
                        extra={"action": "connect"})  # fmt: skip
        self._on_connected(connected)


def _close_quietly(resource: Any) -> None:
    """Close a docker-py client or event stream; closing the stream frees its reading thread."""
    if resource is None:
        return
    try:
        resource.close()
    except Exception as exc:  # closing must never mask why we stopped
        logger.debug("closing %r failed: %s", resource, exc)


def docker_host_problem(docker_host: str) -> str | None:
    """What is wrong with a `DOCKER_HOST` URL that no retry can fix (its syntax, a port out
    of range, ssh:// without paramiko, npipe:// off Windows), or None. Builds a client
    without asking the engine anything."""
    try:
        client = docker.APIClient(base_url=docker_host, version=CHECK_API_VERSION, timeout=1)
    except (docker.errors.DockerException, ValueError) as exc:
        return str(exc) or type(exc).__name__
    client.close()
    return None


class DiscoveryError(Exception):
    """The engine could not be listed (one-shot use); the message names the engine."""


def list_once(
    *, docker_host: str, label_prefix: str, timeout: float = 30.0
) -> tuple[tuple[ContainerView, ...], DiscoveryContext]:
    """Blocking one-shot snapshot of the running containers, as `serve` would publish it
    (used by `labelproxy check`)."""
    problem = docker_host_problem(docker_host)
    if problem is not None:
        raise DiscoveryError(f"cannot use the Docker engine at {docker_host}: {problem}")
    try:
        client: Any = docker.DockerClient(base_url=docker_host, timeout=timeout)
        try:
            views, _ = list_running(client, ListMemo(), label_prefix=label_prefix)
        finally:
            client.close()
    except DOCKER_ERRORS as exc:
        raise DiscoveryError(f"cannot list the containers of {docker_host}: {exc}") from None
    context = DiscoveryContext(
        label_prefix=label_prefix,
        own_networks=own_networks(views, read_own_hints()),
        daemon_host=daemon_host_of(docker_host),
    )
    return views, context
