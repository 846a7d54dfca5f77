"""Side-by-side benchmark of labelproxy against direct, HAProxy, nginx stream and socat.

Run `python -m bench` (full, under 10 minutes) or `python -m bench --quick` (seconds). Every
process is a child of the bench on 127.0.0.1; results go to `bench/results/latest.md` and
`latest.json`. See `bench/cli.py` for the options.
"""
