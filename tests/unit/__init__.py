"""Pure tests: tables over labels, fields, the desired state, the routes file, settings, units,
the reconciler's plan, metrics, health config and state, kernel eligibility and rulesets. No
process, engine or namespace; a few bind a loopback socket to check a table against the kernel.
"""
