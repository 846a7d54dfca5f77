"""The routes file as an input of the runtime: load, reload on change or SIGHUP, and what to
keep when a reload fails.

- The file cannot be read or is not valid YAML: every previous static route is kept
  (`labelproxy_routes_file_reloads_total{result="error"}`); at start-up there are none yet,
  and the log says so.
- The file loads but some routes are broken: each broken route that was good before keeps
  its last good version (by route name) and its problem says so, on /routes and in the log
  (`result="partial"`); the other routes are applied as written.
- A route no longer in the file is removed. Everything loads: `result="ok"`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import anyio

from labelproxy.metrics import Metrics
from labelproxy.sources.routesfile import (
    RoutesFileError,
    StaticRoutes,
    keep_last_good,
    load_routes_file,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0


class RoutesFileInput:
    """The static routes read from `path` (none when `path` is None); `on_change` is called
    after every load that changed what to serve."""

    def __init__(
        self, path: Path | None, *, metrics: Metrics, on_change: Callable[[], None]
    ) -> None:
        self.path = path
        self.static = StaticRoutes({})
        self._metrics = metrics
        self._on_change = on_change
        self._loaded = False  # the file was read at least once
        self._mtime: float | None = None

    def load(self) -> None:
        """(Re)read the file (see the module doc for what a failure keeps)."""
        path = self.path
        if path is None:
            return
        try:
            self._mtime = path.stat().st_mtime
            specs, problems = load_routes_file(path)
        except (RoutesFileError, OSError) as exc:
            self._metrics.reloads_total.labels("error").inc()
            if isinstance(exc, OSError):
                exc = RoutesFileError(f"cannot read routes file {path}: {exc.strerror or exc}")
            if self._loaded:
                keeping = f"keeping the previous {len(self.static.by_name)} static routes"
            else:
                keeping = "no static routes until it loads (it is watched for changes)"
            logger.error("routes file not loaded, %s: %s", keeping, exc,
                         extra={"action": "reload"})  # fmt: skip
            return
        self._loaded = True
        self.static = static = keep_last_good(self.static.by_name, specs, problems)
        result = "partial" if static.problems else "ok"
        self._metrics.reloads_total.labels(result).inc()
        for problem in static.problems:
            logger.error("routes file problem: %s", problem, extra={"route": problem.route})
        kept = f"; kept the last good version of: {', '.join(static.kept)}" if static.kept else ""
        logger.info(
            "routes file loaded (%s): %d routes, %d problems%s", result, len(static.by_name),
            len(static.problems), kept, extra={"action": "reload"},
        )  # fmt: skip
        self._on_change()

    def on_sighup(self) -> None:
        if self.path is None:
            logger.info("SIGHUP: no routes file to reload (LABELPROXY_ROUTES_FILE is not set)",
                        extra={"action": "reload"})  # fmt: skip
            return
        logger.info("SIGHUP: reloading the routes file", extra={"action": "reload"})
        self.load()

    async def watch(self) -> None:
        """Reload whenever the file's mtime changes (or it appears or goes); never returns."""
        path = self.path
        if path is None:
            await anyio.sleep_forever()
            return
        while True:
            await anyio.sleep(POLL_INTERVAL)
            try:
                mtime: float | None = path.stat().st_mtime
            except OSError:
                mtime = None
            if mtime != self._mtime:
                self._mtime = mtime
                self.load()
