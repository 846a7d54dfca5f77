"""Command line: `labelproxy [run]`, `labelproxy check [--compose FILE]`, `labelproxy routes`.

Settings are built here, once, and passed down; a bad setting, or one start-up cannot use (an
HTTP address already taken, an unusable engine URL), stops start-up with one line naming the
variable (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from labelproxy import __version__
from labelproxy.settings import Settings, SettingsError, load_settings, split_host_port

EXIT_SETTINGS = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelproxy",
        description="Docker-label-driven TCP/UDP proxy with per-route Prometheus metrics. "
        "Configured by LABELPROXY_* environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"labelproxy {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the proxy (the default)")
    check = sub.add_parser(
        "check",
        help="lint the labels of the running containers or of a compose file; exit 1 on errors",
    )
    check.add_argument("--compose", type=Path, metavar="FILE", help="a compose file to lint")
    routes = sub.add_parser("routes", help="print a running instance's /routes as a table")
    routes.add_argument(
        "--url",
        help="base URL of the instance (default: from LABELPROXY_HTTP_ADDR)",
    )
    routes.add_argument("--json", action="store_true", help="print the raw JSON")
    return parser


def _settings(err: TextIO) -> Settings | None:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"labelproxy: {exc}", file=err)
        return None


def _base_url(settings: Settings) -> str:
    host, port = split_host_port(settings.http_addr)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def format_routes(doc: dict[str, Any]) -> str:
    """Render a /routes document as an aligned text table plus its problems."""
    rows = [("ROUTE", "LISTEN", "SCHEME", "STATE", "FORWARDING", "CHECK", "BACKENDS", "ACTIVE",
             "IN", "OUT")]
    why_relay: dict[str, list[str]] = {}
    kernel_routes = 0
    unready: list[str] = []
    for r in doc.get("routes", []):
        counters = r.get("counters", {})
        active = counters.get("connections_active", 0) + counters.get("udp_sessions_active", 0)
        backends = ",".join(
            b["address"]
            + (f"({b['container']})" if b.get("container") else "")
            + (f"={b['state']}" if b.get("state") else "")
            for b in r.get("backends", [])
        )
        forwarding = r.get("forwarding", "relay")
        flow_in, flow_out = counters.get("bytes_in", 0), counters.get("bytes_out", 0)
        if forwarding == "kernel":
            kernel_routes += 1
            flow_in = counters.get("ip_bytes_in", 0)
            flow_out = counters.get("ip_bytes_out", 0)
            if r.get("client_address_hidden"):
                forwarding += " (masq)"
        elif r.get("forwarding_reason"):
            why_relay.setdefault(r["forwarding_reason"], []).append(r["route"])
        unready.extend(
            f"  {r['route']} {r['listen']} {b['address']}: {b['state']}"
            + (f" (last check: {b['last_error']})" if b.get("last_error") else "")
            for b in r.get("backends", [])
            if b.get("ready") is False
        )
        rows.append(
            (
                r["route"],
                r["listen"],
                r["scheme"],
                r["state"] + (f" ({r['wake']['state']})" if r.get("wake") else ""),
                forwarding,
                r.get("healthcheck", {}).get("healthcheck", "-"),
                backends or "-",
                str(active),
                str(flow_in),
                str(flow_out),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
             for row in rows]
    if kernel_routes:
        lines.append("(kernel routes: IN/OUT are IP bytes, headers included; masq: the "
                     "upstream sees this host, not the client)")
    if why_relay:
        lines.append("")
        lines.append("ON THE RELAY")
        for reason, names in why_relay.items():
            shown = ", ".join(sorted(set(names))[:5])
            more = len(set(names)) - 5
            lines.append(f"  {reason}: {shown}" + (f" and {more} more" if more > 0 else ""))
    if unready:
        lines += ["", "BACKENDS NOT READY", *unready]
    wake_errors = [f"  {r['route']} {r['listen']} ({r['wake'].get('container')}): "
                   f"{r['wake']['error']}" for r in doc.get("routes", [])
                   if r.get("wake", {}).get("error")]  # fmt: skip
    if wake_errors:
        lines += ["", "WAKE ON DEMAND FAILING", *wake_errors]
    problems = doc.get("problems", [])
    if problems:
        lines.append("")
        lines.append("PROBLEMS")
        lines.extend(f"  [{p['kind']}] {p['text']}" for p in problems)
    docker = doc.get("docker", {})
    if docker.get("enabled"):
        state = "connected" if docker.get("connected") else "DISCONNECTED"
        lines.append(f"\ndocker: {state}, {docker.get('containers', 0)} containers")
    return "\n".join(lines)


def _routes(url: str | None, as_json: bool, out: TextIO, err: TextIO) -> int:
    settings = _settings(err)
    if settings is None:
        return EXIT_SETTINGS
    base = (url or _base_url(settings)).rstrip("/")
    try:
        with urllib.request.urlopen(base + "/routes", timeout=5) as resp:
            doc = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"labelproxy: cannot read {base}/routes: {exc}", file=err)
        return 1
    print(json.dumps(doc, indent=2) if as_json else format_routes(doc), file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    if args.command == "routes":
        return _routes(args.url, args.json, out, err)
    settings = _settings(err)
    if settings is None:
        return EXIT_SETTINGS
    if args.command == "check":
        from labelproxy.lint.check import run_check  # noqa: PLC0415 - only this command needs it

        return run_check(
            compose_file=args.compose,
            docker_host=settings.docker_host,
            label_prefix=settings.label_prefix,
            out=out,
        )
    from labelproxy.logs import configure_logging  # noqa: PLC0415
    from labelproxy.runtime import StartupError, run  # noqa: PLC0415

    configure_logging(level=settings.log_level, fmt=settings.log_format)
    try:
        return run(settings)
    except StartupError as exc:
        print(f"labelproxy: {exc}", file=err)
        return EXIT_SETTINGS
