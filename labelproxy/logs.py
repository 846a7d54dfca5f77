"""Logging set-up: one line per event, as text (`key=value` context) or as one JSON object.

Context travels in `extra=` fields; the ones DESIGN.md names (route, container, protocol,
listen, dst, action) and the access-log fields (client, backend, bytes_in, bytes_out,
duration, reason, server_name: the name a client of a route chosen by name asked for) are
rendered when present. The access log is the `labelproxy.access` logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

CONTEXT_FIELDS = (
    "route",
    "container",
    "protocol",
    "listen",
    "client",
    "backend",
    "dst",
    "action",
    "bytes_in",
    "bytes_out",
    "duration",
    "reason",
    "server_name",
)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in CONTEXT_FIELDS:
        value = record.__dict__.get(name)
        if value is not None and value != "":
            fields[name] = value
    return fields


class TextFormatter(logging.Formatter):
    """`2026-01-01T00:00:00.123Z INFO  route up route=ssh listen=tcp://[::]:2222 ...`"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        parts = [stamp, f"{record.levelname:<5}", record.getMessage()]
        for key, value in _context(record).items():
            text = str(value)
            if not text or any(c.isspace() for c in text) or '"' in text:
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and every context field."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        obj.update(_context(record))
        if record.exc_info:
            obj["error"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, separators=(",", ":"))


def configure_logging(*, level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Install one handler on the root logger (replacing any) with the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # docker-py's HTTP stack is chatty at DEBUG; keep it at WARNING unless asked otherwise.
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # so is pyroute2's netlink (the kernel path: a line per message), which resets its own
    # logger's level when it is imported (later, and only for the kernel path): a filter
    handler.addFilter(_quiet_pyroute2)


def _quiet_pyroute2(record: logging.LogRecord) -> bool:
    """False for pyroute2's records below WARNING."""
    return record.levelno >= logging.WARNING or not record.name.startswith("pyroute2")
