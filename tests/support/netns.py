"""Network namespaces for kernel tests: nothing they do touches the host's own network.

`Topology` (a context manager) creates two namespaces with run-unique names
(`lpk-<random>-h`, `lpk-<random>-c`): `host` plays the machine labelproxy runs on and `client`
a remote machine, joined by a veth pair created inside them (`lp0` 192.0.2.1/24 and
2001:db8::1/64 in `host`, `cl0` 192.0.2.2/24 and 2001:db8::2/64 in `client`; documentation
ranges). Leaving the block kills every agent it started and deletes exactly the namespaces it
created (`ip netns del NAME`), which takes their links, nftables tables, conntrack entries and
sysctls with them.

`add_bridged()` and `add_routed()` add a third namespace for upstreams that are not local
addresses: one behind a bridge of the host namespace (replies come back through it), one
behind a gateway (they would not).

`Topology.agent(ns)` starts a `tests.support.nsagent` process inside a namespace
(`ip netns exec`) and returns an `Agent` whose `call(op, **args)` sends one command and waits
(with a deadline) for its answer. Engines, servers and clients all run in such agents;
`Topology.start_agents(ns, ...)` starts several side by side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CALL_TIMEOUT = 30.0
HOST_V4, CLIENT_V4 = "192.0.2.1", "192.0.2.2"
HOST_V6, CLIENT_V6 = "2001:db8::1", "2001:db8::2"
BRIDGE_HOST, BRIDGED = "203.0.113.1", "203.0.113.2"
ROUTED = "203.0.113.50"


class AgentError(Exception):
    """An agent answered with an error, died, or did not answer in time."""


def missing_requirements() -> str | None:
    """Why namespace tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def _sysctl(netns: str, name: str, value: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{name}={value}"],
                          capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"sysctl {name} in {netns}: {done.stderr.strip()}")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Agent:
    """A `tests.support.nsagent` process in one namespace."""

    def __init__(self, netns: str, *, wait: bool = True) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.netns = netns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.support.nsagent"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait (with a deadline) for the agent's first line: it is ready for commands."""
        self._wait_line(CALL_TIMEOUT)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _wait_line(self, timeout: float) -> Any:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AgentError(f"agent in {self.netns}: no answer in {timeout:.0f}s") from None
        if line is None:
            raise AgentError(f"agent in {self.netns} exited ({self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise AgentError(reply["error"])
        return reply["ok"]

    def call(self, op: str, wait: float = CALL_TIMEOUT, **args: Any) -> Any:
        """Run one command in the agent and return its result (AgentError on failure);
        `wait` bounds how long the answer may take."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise AgentError(f"agent in {self.netns} is gone: {exc}") from exc
        return self._wait_line(wait)

    def kill(self) -> None:
        """SIGKILL the agent (the whole `ip netns exec` process: it execs python)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Topology:
    """Two namespaces joined by a veth pair; see the module docstring."""

    def __init__(self) -> None:
        tag = secrets.token_hex(4)
        self.host = f"lpk-{tag}-h"
        self.client = f"lpk-{tag}-c"
        self.created: list[str] = []
        self.agents: list[Agent] = []

    def __enter__(self) -> Topology:
        try:
            for name in (self.host, self.client):
                _ip("netns", "add", name)
                self.created.append(name)
                _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", self.host, "link", "add", "lp0", "type", "veth",
                "peer", "name", "cl0", "netns", self.client)
            for ns, dev, v4, v6 in ((self.host, "lp0", HOST_V4, HOST_V6),
                                    (self.client, "cl0", CLIENT_V4, CLIENT_V6)):
                _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
                _ip("-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise
        return self

    def _namespace(self, role: str) -> str:
        name = f"{self.host[:-2]}-{role}"
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def add_bridged(self) -> str:
        """A namespace behind bridge `br0` of the host namespace, like a container on a
        Docker bridge: 203.0.113.2/24, default route via the host (203.0.113.1).
        The host namespace forwards IPv4 from then on. Returns the namespace's name."""
        name = self._namespace("b")
        _ip("-n", self.host, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.host, "addr", "add", f"{BRIDGE_HOST}/24", "dev", "br0")
        _ip("-n", self.host, "link", "add", "vb0", "type", "veth", "peer", "name", "eth0",
            "netns", name)
        _ip("-n", self.host, "link", "set", "vb0", "master", "br0")
        for dev in ("br0", "vb0"):
            _ip("-n", self.host, "link", "set", dev, "up")
        _ip("-n", name, "addr", "add", f"{BRIDGED}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "route", "add", "default", "via", BRIDGE_HOST)
        _sysctl(self.host, "net.ipv4.ip_forward", "1")
        return name

    def add_routed(self) -> str:
        """A namespace reached through a gateway and with no route back to the clients, like
        a server elsewhere: its service address 203.0.113.50 is routed via 198.51.100.2 (its
        link address); it knows only 198.51.100.0/24. Returns the namespace's name."""
        name = self._namespace("r")
        _ip("-n", self.host, "link", "add", "lpfar", "type", "veth", "peer", "name", "far0",
            "netns", name)
        _ip("-n", self.host, "addr", "add", "198.51.100.1/24", "dev", "lpfar")
        _ip("-n", self.host, "link", "set", "lpfar", "up")
        _ip("-n", name, "addr", "add", "198.51.100.2/24", "dev", "far0")
        _ip("-n", name, "addr", "add", f"{ROUTED}/32", "dev", "lo")
        _ip("-n", name, "link", "set", "far0", "up")
        _ip("-n", self.host, "route", "add", f"{ROUTED}/32", "via", "198.51.100.2")
        return name

    def agent(self, netns: str) -> Agent:
        """A new agent process inside `netns` (killed when the topology closes)."""
        agent = Agent(netns)
        self.agents.append(agent)
        return agent

    def start_agents(self, *netns: str) -> list[Agent]:
        """A new agent in each of these namespaces, started side by side (their Python
        start-ups overlap), each ready when this returns; killed when the topology closes."""
        started = [Agent(ns, wait=False) for ns in netns]
        self.agents.extend(started)
        for agent in started:
            agent.wait_ready()
        return started

    def close(self) -> None:
        """Kill the agents, then delete the namespaces this topology created (only those)."""
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.kill()
        for name in reversed(self.created):
            try:
                _ip("netns", "del", name)
            except RuntimeError as exc:
                logger.error("could not delete namespace %s: %s", name, exc)
        self.created.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
