"""A helper process that runs inside a test's network namespace and does what the test asks.

Started by `tests.support.netns.Agent` as `ip netns exec NS python -m tests.support.nsagent`,
it reads one JSON command per line on stdin and answers one JSON line on stdout:
`{"op": "...", ...}` -> `{"ok": result}` or `{"error": "one line"}`. It can serve TCP and UDP
echo (recording each client's address, as an upstream sees it), act as a client (connect,
exchange bytes, hold a connection open), hold a bound socket (the reservation labelproxy keeps
on a listen port), set a sysctl of its namespace, and host a `KernelEngine` (`engine_*` ops),
so the engine's code never runs in the pytest process or the host's namespace.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import resource
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labelproxy.spec import EdgePolicy
from tests.support.kernelspec import route_spec

if TYPE_CHECKING:  # imported by engine_start: pyroute2 takes a third of an agent's start-up
    from labelproxy.kernel.engine import KernelEngine

logger = logging.getLogger(__name__)

BUFFER = 65536


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _error_name(exc: OSError) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    return {
        errno.ECONNREFUSED: "refused",
        errno.ECONNRESET: "reset",
        errno.EPIPE: "reset",
        errno.ETIMEDOUT: "timeout",
        errno.EHOSTUNREACH: "unreachable",
        errno.ENETUNREACH: "unreachable",
    }.get(exc.errno or 0, f"{type(exc).__name__}: {exc}")


class _Clock:
    """Wall time and CPU time (this process and the `nft` it ran) since creation."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = self._cpu()

    @staticmethod
    def _cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def read(self) -> dict[str, float]:
        return {"seconds": time.perf_counter() - self.wall, "cpu": self._cpu() - self.cpu}


class Server:
    """An echo server (TCP or UDP) that records its clients' addresses."""

    def __init__(self, transport: str, host: str, port: int) -> None:
        kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
        self.sock = socket.socket(_family(host), kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.peers: list[str] = []
        self.counts: dict[str, int] = {}  # peer address -> connections (datagrams) from it
        self.accepted = 0
        self.lock = threading.Lock()
        if transport == "tcp":
            self.sock.listen(512)
            target = self._accept_loop
        else:
            target = self._udp_loop
        threading.Thread(target=target, daemon=True).start()

    def _note(self, peer: str) -> None:
        with self.lock:
            self.accepted += 1
            self.counts[peer] = self.counts.get(peer, 0) + 1
            if peer not in self.peers:
                self.peers.append(peer)

    def close(self) -> None:
        """Stop listening (a TCP server's port then refuses)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
        self.sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:  # closed
                return
            self._note(str(addr[0]))
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(BUFFER):
                    conn.sendall(data)
            except OSError:
                pass

    def _udp_loop(self) -> None:
        while True:
            data, addr = self.sock.recvfrom(BUFFER)
            self._note(str(addr[0]))
            self.sock.sendto(data, addr)


class Agent:
    """The command table; one instance per process."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.next_id = 1
        self.engine: KernelEngine | None = None

    def _keep(self, obj: Any) -> int:
        ident = self.next_id
        self.next_id += 1
        self.objects[ident] = obj
        return ident

    # -- servers and reservations ------------------------------------------------------
    def op_serve(self, transport: str, host: str, port: int) -> int:
        return self._keep(Server(transport, host, port))

    def op_peers(self, server: int) -> dict[str, Any]:
        srv: Server = self.objects[server]
        with srv.lock:
            return {"peers": list(srv.peers), "accepted": srv.accepted}

    def op_peer_counts(self, server: int) -> dict[str, int]:
        """Connections (datagrams) per client address."""
        srv: Server = self.objects[server]
        with srv.lock:
            return dict(srv.counts)

    def op_unserve(self, server: int) -> None:
        srv: Server = self.objects.pop(server)
        srv.close()

    def op_reserve(self, transport: str, bind: str, port: int, v6only: bool = False) -> int:
        kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(_family(bind), kind)
        if ":" in bind:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        if transport == "tcp":
            sock.listen(16)  # nothing accepts: a flow the kernel did not take hangs
        return self._keep(sock)

    def op_release(self, ident: int) -> None:
        self.objects.pop(ident).close()

    def op_sysctl(self, name: str, value: str | None = None) -> str:
        path = Path("/proc/sys") / name.replace(".", "/")
        if value is not None:
            path.write_text(value)
        return path.read_text().strip()

    # -- clients -----------------------------------------------------------------------
    def op_connect(self, host: str, port: int, timeout: float = 3.0) -> dict[str, Any]:
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except OSError as exc:
            sock.close()
            return {"error": _error_name(exc)}
        return {"conn": self._keep(sock)}

    def op_echo(self, conn: int, size: int = 1000, timeout: float = 3.0) -> dict[str, Any]:
        sock: socket.socket = self.objects[conn]
        sock.settimeout(timeout)
        payload = os.urandom(size)
        try:
            sock.sendall(payload)
            got = b""
            while len(got) < size:
                chunk = sock.recv(BUFFER)
                if not chunk:
                    return {"error": "eof"}
                got += chunk
        except OSError as exc:
            return {"error": _error_name(exc)}
        return {"ok": got == payload}

    def op_close(self, conn: int) -> None:
        self.objects.pop(conn).close()

    def op_hold(self, conn: int, size: int = 1000, timeout: float = 3.0) -> dict[str, Any]:
        """Send `size` bytes and read back as many as arrive within `timeout` (a transfer in
        flight: how much came back, and how it ended)."""
        sock: socket.socket = self.objects[conn]
        sock.settimeout(timeout)
        got = 0
        try:
            sock.sendall(os.urandom(size))
            while got < size:
                chunk = sock.recv(BUFFER)
                if not chunk:
                    return {"got": got, "error": "eof"}
                got += len(chunk)
        except OSError as exc:
            return {"got": got, "error": _error_name(exc)}
        return {"got": got}

    def op_http_get(self, url: str, timeout: float = 10.0) -> dict[str, Any]:
        """GET `url` from inside this namespace: {"status", "body"} (status 0: no answer)."""
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return {"status": int(resp.status), "body": resp.read().decode()}
        except urllib.error.HTTPError as exc:
            return {"status": int(exc.code), "body": exc.read().decode(errors="replace")}
        except (OSError, ValueError) as exc:
            return {"status": 0, "body": str(exc)}

    def op_udp_open(self, host: str, port: int) -> int:
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        sock.connect((host, port))
        return self._keep(sock)

    def op_udp_echo(self, sock: int, size: int = 100, count: int = 1,
                    timeout: float = 2.0) -> dict[str, Any]:
        udp: socket.socket = self.objects[sock]
        udp.settimeout(timeout)
        replies = 0
        for _ in range(count):
            payload = os.urandom(size)
            try:
                udp.send(payload)
                if udp.recv(BUFFER) == payload:
                    replies += 1
            except OSError:
                continue
        return {"replies": replies}

    # -- the kernel engine -------------------------------------------------------------
    def _engine(self) -> KernelEngine:
        if self.engine is None:
            raise RuntimeError("engine_start first")
        return self.engine

    def op_engine_start(self, policy: dict[str, Any]) -> str:
        from labelproxy.kernel.engine import KernelEngine  # noqa: PLC0415
        allow = tuple(ipaddress.ip_network(n) for n in policy.pop("allow", ()))
        deny = tuple(ipaddress.ip_network(n) for n in policy.pop("deny", ()))
        engine = self.engine = KernelEngine(policy=EdgePolicy(allow=allow, deny=deny, **policy))
        probe = engine.probe()
        if probe is not None:
            raise RuntimeError(probe)
        return engine.start()

    def op_engine_probe(self) -> str | None:
        return self._engine().probe()

    def op_engine_apply(self, routes: list[dict[str, Any]]) -> dict[str, Any]:
        specs = [route_spec(route) for route in routes]
        clock = _Clock()
        result = self._engine().apply(specs)
        return {
            **clock.read(),
            "routes": {str(k): {"slot": s.slot, "families": list(s.families),
                                "uncovered": list(s.uncovered),
                                "client_address_hidden": s.client_address_hidden}
                       for k, s in result.routes.items()},
            "refused": {str(k): reason for k, reason in result.refused.items()},
        }

    def op_engine_counters(self) -> dict[str, Any]:
        return {str(k): {"connections": c.connections, "active": c.active,
                         "packets_in": c.packets_in, "bytes_in": c.bytes_in,
                         "packets_out": c.packets_out, "bytes_out": c.bytes_out,
                         **{f"rejected_{r}": n for r, n in c.rejected.items()}}
                for k, c in self._engine().counters().items()}

    def op_engine_time_counters(self) -> dict[str, float]:
        clock = _Clock()
        found = self._engine().counters()
        return {**clock.read(), "routes": len(found)}

    def op_engine_draining_active(self) -> int:
        return self._engine().draining_active()

    def op_engine_next_deadline(self) -> float | None:
        deadline: float | None = self._engine().next_deadline()
        return deadline

    def op_engine_cut_expired(self, now: float | None = None) -> list[str]:
        cut: list[str] = self._engine().cut_expired(now)
        return cut

    def op_engine_close(self, keep: bool = False) -> None:
        self._engine().close(keep=keep)


def main() -> None:
    """Serve commands from stdin until it closes."""
    agent = Agent()
    print(json.dumps({"ok": "ready"}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = {"ok": getattr(agent, f"op_{op}")(**request)}
        except Exception as exc:  # reported to the test, which fails with the message
            reply = {"error": f"{op}: {type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
