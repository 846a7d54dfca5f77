"""Health of backends: active checks, passive ejection, and the readiness the pool uses.

Only `labelproxy.spec` (Backend, ListenKey), `labelproxy.units`, anyio and the standard library
are used here, so the control plane and the data plane can both build on it. Nothing is
re-exported: `health.model` must stay importable from `spec` without a cycle.

- `model`: `HealthCheck`, the frozen, hashable check of one route (kind, send/expect,
  interval, timeout, rise, fall); imports nothing from labelproxy.
- `config`: the `healthcheck*` route fields -> `HealthCheck` (`parse_healthcheck`, or the two
  steps `parse_health_fields` + `resolve_health`), with the defaults rule; problems are
  `(field, value, message)`.
- `protocols` / `probes`: the named probes' bytes and judges; `probe()` runs one check.
- `state`: one backend's rise/fall and ejection state machine (pure).
- `views`: `HealthTarget` (input), `StateChange`, `BackendStatus`, `RouteHealth` (output).
- `checker`: `HealthChecker`, the scheduler and the API the data plane reads.

Wiring (a later stage), in short:
- fields/labels/routesfile: `config.owns_field(name)` fields go to `parse_health_fields`
  (syntax) and, once a route's transport is known, `resolve_health(transport=,
  docker_health=view.health != "none")`; `RouteOptions.healthcheck: HealthCheck` carries it.
- runtime: one `HealthChecker` started with `task_group.start(checker.serve)` before the
  listeners; after each applied snapshot, `checker.set_targets({key: HealthTarget(
  spec.options.healthcheck, spec.backends, route=spec.alias)})` for every route (checked
  or not: passive ejection needs them all), before the listeners get the new specs.
- data plane: pick among `spec.backends` that `checker.is_ready(key, b)` (or intersect
  with `ready_backends(key)`); with none ready, hold the client up to `connect_timeout` and
  wake on a `subscribe`d `StateChange` with `ready=True` (listeners run on the thread of the
  change: hand it to the data loop with `DataLoop.submit`), then refuse with `no_backend`;
  report every dial: `report_dial_failure(key, b, why=...)` for refused/timeout/reset before
  any byte, `report_dial_success(key, b)` on connect.
- metrics and /routes from `checker.status(key)` / `statuses()` at scrape time.
"""
