"""The upstream servers every target relays to, started once per run on 127.0.0.1.

- `iperf`: a persistent `iperf3 -s` (one test at a time, the bench runs them one by one);
- `echo`: the C epoll TCP echo server (also holds the idle connections of the memory section);
- `http`: nginx serving a tiny static response (its own process, one worker, not the peer);
- `uecho`: the C UDP echo server; `usink`: the C counting UDP sink (`UdpSink.report`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Children, read_line, wait_until_listening
from bench.toolchain import Tools

logger = logging.getLogger(__name__)

TCP_ROUTES = ("iperf", "echo", "http")
UDP_ROUTES = ("uecho", "usink")
HTTP_BODY = "hello from the labelproxy bench upstream\n"


@dataclass(frozen=True, slots=True)
class SinkReport:
    """Datagrams the sink received since its previous report."""

    received: int
    bytes: int
    first_ns: int
    last_ns: int


@dataclass(slots=True)
class UdpSink:
    """The counting sink; `report()` returns and resets its counters."""

    proc: subprocess.Popen[bytes]

    def report(self, *, timeout: float = 10.0) -> SinkReport:
        os.kill(self.proc.pid, signal.SIGUSR1)
        assert self.proc.stdout is not None
        data = json.loads(read_line(self.proc.stdout, timeout=timeout))
        return SinkReport(
            received=int(data["received"]),
            bytes=int(data["bytes"]),
            first_ns=int(data["first_ns"]),
            last_ns=int(data["last_ns"]),
        )


@dataclass(frozen=True, slots=True)
class Upstreams:
    """Route name -> upstream port, and the sink handle."""

    ports: dict[str, int]
    sink: UdpSink


def nginx_http_conf(*, prefix: Path, port: int) -> str:
    return f"""
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "{HTTP_BODY.strip()}\\n"; }}
    }}
}}
"""


def _start_c_server(
    children: Children, tools: Tools, mode: str, port: int
) -> subprocess.Popen[bytes]:
    proc = children.start(
        [str(tools.server), mode, str(port)], name=f"upstream-{mode}", stdout_pipe=True
    )
    assert proc.stdout is not None
    read_line(proc.stdout, timeout=10.0)  # "ready" once bound
    return proc


def start_upstreams(
    children: Children, *, tools: Tools, workdir: Path, ports: dict[str, int]
) -> Upstreams:
    """Start every upstream on the given ports and wait until each is serving."""
    deadline = time.monotonic() + 20.0
    iperf = children.start(
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(ports["iperf"])], name="upstream-iperf3"
    )
    _start_c_server(children, tools, "tcp-echo", ports["echo"])
    _start_c_server(children, tools, "udp-echo", ports["uecho"])
    sink = UdpSink(_start_c_server(children, tools, "udp-sink", ports["usink"]))
    prefix = workdir / "nginx-http"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_http_conf(prefix=prefix, port=ports["http"]))
    http = children.start(
        ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        name="upstream-nginx-http",
    )
    wait_until_listening([ports["http"]], deadline=deadline, alive=http)
    wait_until_listening([ports["iperf"]], deadline=deadline, alive=iperf)
    return Upstreams(ports=dict(ports), sink=sink)
