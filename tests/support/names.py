"""Real TLS and Minecraft parts for the tests of routes chosen by name (`hostnames`).

`make_cert(dir, name)` makes a self-signed certificate for `name` with `openssl`;
`TlsUpstream` is a Python `ssl` server on loopback (a thread, one connection at a time)
that answers each line with its own name; `s_server` runs `openssl s_server` the same way.
`tls_hello(name)` is a real ClientHello from Python's `ssl` (a memory BIO), and
`bio_handshake` finishes such a handshake over a socket after the caller sent the first
flight its own way (one byte at a time, over two records...). Every wait has a deadline.
The Minecraft side is `tests/support/minecraft.py`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support.lp import free_port, wait_for
from tests.support.servers import require

TIMEOUT = 5.0


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed EC certificate and key for `name` (CN and subjectAltName)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [require("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def client_context(*certs: Path) -> ssl.SSLContext:
    """A client context that trusts exactly `certs` and checks host names."""
    ctx = ssl.create_default_context()
    for cert in certs:
        ctx.load_verify_locations(cafile=str(cert))
    return ctx


def peer_cn(sock: ssl.SSLSocket | ssl.SSLObject) -> str:
    cert = sock.getpeercert()
    assert cert is not None
    for rdn in cert["subject"]:
        for pair in rdn:
            if pair[0] == "commonName":
                return str(pair[1])
    return ""


class TlsUpstream:
    """A Python `ssl` server answering every line with `<name>:<line>`."""

    def __init__(self, name: str, cert: Path, key: Path) -> None:
        self.name = name
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.seen: list[str | None] = []  # the SNI of each handshake
        self._stop = threading.Event()
        self.ctx.sni_callback = self._saw
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _saw(self, sock: ssl.SSLObject, sni: str | None, ctx: ssl.SSLContext) -> None:
        self.seen.append(sni)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(TIMEOUT)
        with contextlib.suppress(OSError), self.ctx.wrap_socket(raw, server_side=True) as tls:
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
                while b"\n" in data:
                    line, data = data.split(b"\n", 1)
                    tls.sendall(self.name.encode() + b":" + line + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.sock.close()


@contextlib.contextmanager
def s_server(cert: Path, key: Path) -> Iterator[int]:
    """`openssl s_server` on a free loopback port (its port), stopped by PID."""
    port = free_port()
    proc = subprocess.Popen(
        [require("openssl"), "s_server", "-quiet", "-accept", f"127.0.0.1:{port}",
         "-cert", str(cert), "-key", str(key)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: _listening(port), timeout=10, what="openssl s_server")
        yield port
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        if proc.stdin is not None:
            proc.stdin.close()


def _listening(port: int) -> bool:
    # a probe connection would take s_server's one slot: look at the socket table instead
    hex_port = f":{port:04X} "
    with open("/proc/net/tcp") as table:
        return any(hex_port in line and line.split()[3] == "0A" for line in table)


def s_client_cn(port: int, servername: str | None) -> str:
    """The subject `openssl s_client` sees through `port` ("" when the handshake failed)."""
    args = [require("openssl"), "s_client", "-connect", f"127.0.0.1:{port}"]
    args += ["-servername", servername] if servername else ["-noservername"]
    done = subprocess.run(args, check=False, input=b"", capture_output=True,
                          timeout=TIMEOUT * 2)  # fmt: skip
    for line in done.stdout.decode(errors="replace").splitlines():
        if line.startswith("subject="):
            return line.split("CN", 1)[1].lstrip(" =").strip()
    return ""


def tls_ask(port: int, name: str | None, ctx: ssl.SSLContext) -> tuple[str, str]:
    """(certificate CN, answer) of one line sent through a TLS connection to `port`."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        check = ctx.check_hostname
        if name is None:
            ctx.check_hostname = False
        try:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                tls.sendall(b"hello\n")
                return peer_cn(tls), _line(tls)
        finally:
            ctx.check_hostname = check


def _line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def tls_hello(name: str | None) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A client handshake in memory and its first flight (a real ClientHello)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return obj, incoming, outgoing, outgoing.read()


def two_records(hello: bytes) -> bytes:
    """`hello` (one record) re-framed as two handshake records, split inside the message."""
    body = hello[5:]
    cut = len(body) // 3
    return b"".join(
        hello[:3] + len(part).to_bytes(2, "big") + part for part in (body[:cut], body[cut:])
    )


def bio_handshake(
    port: int, name: str | None, send_first: Callable[[socket.socket, bytes], None]
) -> str:
    """A TLS handshake through `port` whose ClientHello `send_first` sends; then one line
    each way. Returns the answer (the upstream's name and the line)."""
    obj, incoming, outgoing, hello = tls_hello(name)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        send_first(sock, hello)
        while True:
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
        sock.sendall(outgoing.read())
        obj.write(b"split\n")
        sock.sendall(outgoing.read())
        answer = b""
        while not answer.endswith(b"\n"):
            data = sock.recv(65536)
            assert data, "closed before the answer"
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                answer += obj.read()
        return answer.decode().strip()
