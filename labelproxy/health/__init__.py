"""Health of backends: active checks, passive ejection, and the readiness the pool uses.

Only `labelproxy.spec` (Backend, ListenKey), `labelproxy.units`, anyio and the standard library
are used here, so the control plane and the data plane can both build on it. The check
itself, `HealthCheck` (kind, send/expect, interval, timeout, rise, fall), is part of the route
contract and lives beside `spec` in `labelproxy.healthcheck`, which imports nothing of ours.
- `config`: the `healthcheck*` route fields -> `HealthCheck` (`parse_healthcheck`, or the two
  steps `parse_health_fields` + `resolve_health`), with the defaults rule; problems are
  `(field, value, message)`.
- `protocols` / `probes`: the named probes' bytes and judges; `probe()` runs one check.
- `state`: one backend's rise/fall and ejection state machine (pure).
- `views`: `HealthTarget` (input), `StateChange`, `BackendStatus`, `RouteHealth` (output).
- `checker`: `HealthChecker`, the scheduler and the API the data plane reads.
- `tcpbatch`: `TcpBatch`, the default `tcp` checks of every backend on one loop (the runtime
  gives the TCP data loop; `AsyncioCheckLoop` drives it from the event loop otherwise).
- `slots`: `CheckSlots`, the one cap on checks in flight, taken from both threads.
- `targets`: `health_targets(routes)`, the checker's targets, a port range checked on its first
  port (the others `follow` it).

Wiring (a later stage):
- fields/labels/routesfile: names with `config.owns_field(name)` go to
  `parse_health_fields` (syntax, problems named by `label_of(field)`), and once a route's
  transport is known, to `resolve_health(transport=, docker_health=view.health != "none")`
  (False for routes-file routes); `RouteOptions.healthcheck: HealthCheck = HealthCheck()`
  carries the result. labels.py stops ignoring `healthcheck` as a GoDoxy HTTP field.
- runtime: one `HealthChecker` started with `await task_group.start(checker.serve)` before
  the listeners; after each applied snapshot, `checker.set_targets({key: HealthTarget(
  spec.options.healthcheck, spec.backends, route=spec.alias)})` for every route (checked or
  not: passive ejection needs them all), before the listeners get the new specs.
- data plane: pick among `spec.backends` those with `checker.is_ready(key, b)`; with none,
  hold a new TCP client up to `connect_timeout`, woken by a `subscribe`d listener's
  `StateChange(ready=True)` (listeners run on the thread of the change: hand over with
  `DataLoop.submit`), else refuse it (`no_backend`). Report every dial:
  `report_dial_failure(key, b, why=...)` (refused, timeout, reset before any byte) and
  `report_dial_success(key, b)` (lock-free unless failures were counted).
- metrics and /routes read `checker.status(key)` / `statuses()` at scrape time:
  `backend_up` from `BackendStatus.ready`, `health_checks_total{result}` from
  `RouteHealth.results`, `backend_ejections_total` from `RouteHealth.ejections`, and
  `BackendStatus.as_json()` per backend on `/routes`.
"""
