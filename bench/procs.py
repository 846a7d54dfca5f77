"""Child processes of the benchmark and what /proc says about them.

`Children` starts every process the bench needs (each one a direct child, its output in a log
file or a pipe), stops them by PID in reverse order, and never leaves one behind. The helpers
read CPU time and proportional memory (PSS) of a process tree from /proc, find free loopback
ports and wait, each with a deadline, for a port to accept or a line to appear.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A target or tool failed in a way that makes its measurement meaningless."""


def free_port(*, kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that is free for both TCP and UDP right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, kind) as first:
            first.bind((LOOPBACK, 0))
            port: int = first.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as second:
                second.bind((LOOPBACK, port))
        except OSError:
            continue
        return port
    raise BenchError("no free loopback port found")


def tcp_accepts(port: int, *, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """Whether a TCP connect to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def udp_bound(port: int, *, host: str = LOOPBACK) -> bool:
    """Whether some process has bound UDP host:port (our own bind is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def tcp_listening(port: int) -> bool:
    """Whether /proc/net/tcp shows a socket listening on 127.0.0.1:port (no connection made:
    iperf3 would take a probe connection for a test)."""
    wanted = f"0100007F:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(
        fields[1] == wanted and fields[3] == "0A" for fields in (line.split() for line in lines)
    )


def wait_until_listening(
    ports: Iterable[int], *, deadline: float, alive: subprocess.Popen[bytes] | None = None
) -> None:
    """Return once every TCP port listens; raise `BenchError` at the deadline or on exit."""
    pending = list(ports)
    while pending:
        pending = [port for port in pending if not tcp_listening(port)]
        if not pending:
            return
        if alive is not None and alive.poll() is not None:
            raise BenchError(f"process {alive.pid} exited with {alive.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"ports {pending} not accepting before the deadline")
        time.sleep(0.02)


def wait_until_udp_bound(ports: Iterable[int], *, deadline: float) -> None:
    """Return once every UDP port is bound by someone; raise `BenchError` at the deadline."""
    for port in ports:
        while not udp_bound(port):
            if time.monotonic() > deadline:
                raise BenchError(f"UDP port {port} not bound before the deadline")
            time.sleep(0.02)


def read_line(stream: IO[bytes], *, timeout: float) -> str:
    """One line from a child's stdout pipe, or `BenchError` when none arrives in time."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise BenchError(f"no output within {timeout:.1f}s")
    line = stream.readline()
    if not line:
        raise BenchError("the process closed its output")
    return line.decode().strip()


@dataclass
class Children:
    """Processes the bench started; `stop_all` ends them newest first, by PID."""

    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` as a child; stderr (and stdout unless piped) go to `<name>.log`."""
        log = (self.log_dir / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
        finally:
            log.close()
        self.procs.append(proc)
        logger.debug("started %s pid %d: %s", name, proc.pid, " ".join(argv))
        return proc

    def stop(
        self,
        proc: subprocess.Popen[bytes],
        *,
        timeout: float = 5.0,
        first: signal.Signals = signal.SIGTERM,
    ) -> None:
        """`first` (SIGTERM), then SIGKILL after `timeout`; always reaps the child. Its
        descendants (socat's per-client forks) get SIGTERM too, by PID, so none outlives
        the bench."""
        descendants = process_tree([proc.pid])[1:] if proc.poll() is None else []
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, first)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def log_tail(self, name: str, *, lines: int = 8) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces: fields start after the last ')'
    return raw[raw.rfind(")") + 2 :].split()


def process_tree(roots: Iterable[int]) -> list[int]:
    """The root PIDs and all their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    result: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        result.append(pid)
        stack.extend(children.get(pid, ()))
    return result


def cpu_split(roots: Iterable[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of a process tree, including children it has reaped."""
    user = system = 0
    for pid in process_tree(roots):
        fields = _stat_fields(pid)
        if fields is not None:  # utime stime cutime cstime are fields 14-17 (1-based)
            user += int(fields[11]) + int(fields[13])
            system += int(fields[12]) + int(fields[14])
    return user / _CLK_TCK, system / _CLK_TCK


def cpu_seconds(roots: Iterable[int]) -> float:
    """User+system CPU of a process tree, including children it has already reaped."""
    return sum(cpu_split(roots))


def pss_bytes(roots: Iterable[int]) -> int:
    """Proportional set size of a process tree (each shared page split among its users)."""
    total = 0
    for pid in process_tree(roots):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def raise_nofile_limit(*, wanted: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (the hard limit too when root may) to `wanted`; children inherit it.

    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return max(soft, hard)
