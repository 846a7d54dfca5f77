"""Starting and stopping containers for wake on demand: the engine calls, nothing else.

The second module allowed to import `docker` (beside `discovery`, which only reads): `Power`
starts a sleeping container (unpausing a paused one), puts one to sleep with its
`stop_method` (`stop` with a grace and a signal, `pause`, `kill` with a signal) and finds the
containers a `depends_on` names (a container name, or a compose service of the same project).

A refusal by the engine (HTTP 401/403/405: a read-only socket proxy, an authorization plugin)
is a `PowerRefusedError` whose message says what to allow; any other failure a `PowerError`.
Calls run on daemon threads (`blocking.run_blocking`), one client for the process, made on
first use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import docker
import docker.errors
import requests.exceptions

from labelproxy.sources.blocking import run_blocking
from labelproxy.spec import Sleep

logger = logging.getLogger(__name__)

_REFUSED = frozenset({401, 403, 405})
_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)
ALLOW_HINT = (
    "the engine refused it: a socket proxy must allow the container start/stop calls "
    "(tecnativa/docker-socket-proxy: ALLOW_START=1 ALLOW_STOP=1, ALLOW_RESTARTS=1 for "
    "stop_method kill, POST=1 for pause)"
)


class PowerError(Exception):
    """A start or stop failed (one line: what and why)."""


class PowerRefusedError(PowerError):
    """The engine refused the start or stop (permissions, not the container)."""


class Power:
    """Start/stop calls on one engine (thread-safe; blocking calls on daemon threads)."""

    def __init__(self, *, docker_host: str, api_timeout: float = 30.0) -> None:
        self._docker_host = docker_host
        self._api_timeout = api_timeout
        self._client: Any = None
        self._lock = threading.Lock()

    def _api(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = docker.APIClient(
                    base_url=self._docker_host, version="auto", timeout=self._api_timeout
                )
            return self._client

    async def start(self, container: str) -> None:
        """Start (or unpause) `container` (an id or name); running already: nothing."""
        await run_blocking(self._call, "start", self._start, container, name="labelproxy-power")

    async def sleep(self, sleep: Sleep) -> None:
        """Put `sleep.container_id` to sleep with its `stop_method`."""
        await run_blocking(self._call, sleep.stop_method, self._sleep, sleep,
                           name="labelproxy-power")  # fmt: skip

    async def dependencies(self, sleep: Sleep) -> list[str]:
        """The ids of the containers `sleep.depends_on` names, in its order; a name that
        matches nothing is a `PowerError`."""
        return await run_blocking(self._call, "find", self._dependencies, sleep,
                                  name="labelproxy-power")  # fmt: skip

    async def state(self, container: str) -> str:
        """The engine's state of `container` (`running`, `exited`, `paused`...)."""
        return await run_blocking(self._call, "inspect", self._state, container,
                                  name="labelproxy-power")  # fmt: skip

    # -- worker threads -------------------------------------------------------------------
    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(self._api(), *args)
        except docker.errors.APIError as exc:
            status = exc.status_code or 0
            if status in _REFUSED:
                raise PowerRefusedError(f"{what} refused (HTTP {status}): {ALLOW_HINT}") from None
            raise PowerError(f"{what} failed: {exc.explanation or exc}") from None
        except _ERRORS as exc:
            raise PowerError(f"{what} failed: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _state(api: Any, container: str) -> str:
        return str((api.inspect_container(container).get("State") or {}).get("Status") or "")

    @staticmethod
    def _start(api: Any, container: str) -> None:
        state = Power._state(api, container)
        if state == "paused":
            api.unpause(container)
        elif state != "running":
            api.start(container)

    @staticmethod
    def _sleep(api: Any, sleep: Sleep) -> None:
        cid = sleep.container_id
        if sleep.stop_method == "pause":
            if Power._state(api, cid) == "running":
                api.pause(cid)
        elif sleep.stop_method == "kill":
            api.kill(cid, signal=sleep.stop_signal or "SIGKILL")
        else:
            stop_timeout = max(1, round(sleep.stop_timeout))
            params: dict[str, Any] = {"t": stop_timeout}
            if sleep.stop_signal:
                params["signal"] = sleep.stop_signal
            url = api._url("/containers/{0}/stop", cid)
            # the client's own timeout must outlast the grace the engine gives
            res = api._post(url, params=params, timeout=stop_timeout + api.timeout)
            api._raise_for_status(res)

    @staticmethod
    def _dependencies(api: Any, sleep: Sleep) -> list[str]:
        if not sleep.depends_on:
            return []
        own: Mapping[str, str] = (api.inspect_container(sleep.container_id).get("Config") or {}
                                  ).get("Labels") or {}  # fmt: skip
        project = own.get("com.docker.compose.project", "")
        found: list[str] = []
        everyone = api.containers(all=True)
        for name in sleep.depends_on:
            match = _find(everyone, name, project)
            if match is None:
                raise PowerError(f"depends_on: no container or compose service named {name!r}")
            found.append(match)
        return found


def _find(summaries: list[Mapping[str, Any]], name: str, project: str) -> str | None:
    """The id of the container named `name`, else of a container of compose service `name`
    in `project`."""
    for summary in summaries:
        if any(str(n).lstrip("/") == name for n in summary.get("Names") or ()):
            return str(summary["Id"])
    for summary in summaries:
        labels = summary.get("Labels") or {}
        if labels.get("com.docker.compose.service") == name and (
            not project or labels.get("com.docker.compose.project") == project
        ):
            return str(summary["Id"])
    return None
