"""The `sni` section: connections/s and ping-pong through a listener that routes by name.

HAProxy (`tcp-request inspect-delay` + `req_ssl_sni`, two backends) and labelproxy (two
routes with `hostnames` on one port) each get one extra listen port, route `sni`, whose
names `a.bench.test` and `b.bench.test` both lead to the C echo upstream; `direct` gets the
echo upstream itself, the floor. Every connection sends a real ClientHello for
`b.bench.test` first (made by Python's `ssl` in memory, `LPCLIENT_FIRST`), which the echo
upstream sends back: the figures are the proxies' cost of reading the name and choosing the
route (no TLS handshake is completed; that would cost both the same). Targets without the
route (nginx, socat, pyfloor) are not applicable here.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import shutil
import ssl
import tempfile
from pathlib import Path

from bench.measure import (
    HOST,
    PINGPONG_BYTES,
    SHORT_CONN_BYTES,
    SHORT_CONN_CLIENTS,
    Env,
    Measured,
    _cpu_per,
    _run_json,
)
from bench.procs import BenchError, cpu_split
from bench.sniconf import ASKED, ROUTE
from bench.targets import Target

logger = logging.getLogger(__name__)

@functools.cache
def hello_file() -> Path:
    """A real ClientHello for `ASKED`, in a file the client sends (removed at exit)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=ASKED)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    directory = tempfile.mkdtemp(prefix="labelproxy-bench-sni-")
    atexit.register(shutil.rmtree, directory, True)
    path = Path(directory) / "hello.bin"
    path.write_bytes(outgoing.read())
    return path


def _client_env() -> dict[str, str]:
    return {**os.environ, "LPCLIENT_FIRST": str(hello_file())}


def _port(target: Target) -> int:
    port = target.ports.get(ROUTE)
    if port is None:
        raise BenchError(f"{target.name} has no SNI-routed listener")
    return port


def sni_conns(env: Env, target: Target) -> Measured:
    """Connections/s: connect, ClientHello + 64 B, echo, close; 50 concurrent clients."""
    seconds = env.plan.short_seconds
    argv = [str(env.tools.client), "shortconn", HOST, str(_port(target))]
    argv += [str(SHORT_CONN_CLIENTS), str(seconds), str(SHORT_CONN_BYTES)]
    before = cpu_split(target.roots)
    data = _run_json(argv, timeout=seconds + 30, env=_client_env())
    if data["completed"] == 0:
        raise BenchError(f"no connection completed ({data['errors']} errors)")
    out = Measured(values={"sni_conns_per_s": float(data["rate"])}, raw=data)
    _cpu_per(out, target, before, int(data["completed"]), "sni_conns")
    return out


def sni_pingpong(env: Env, target: Target) -> Measured:
    """64 B round trips over one connection opened with a ClientHello: p50 and p99 (us)."""
    argv = [str(env.tools.client), "pingpong", HOST, str(_port(target))]
    argv += [str(env.plan.pingpong_count), str(PINGPONG_BYTES), "10"]
    data = _run_json(argv, timeout=40, env=_client_env())
    return Measured(
        values={"sni_pingpong_p50_us": float(data["p50_us"]),
                "sni_pingpong_p99_us": float(data["p99_us"])},
        raw=data,
    )  # fmt: skip
