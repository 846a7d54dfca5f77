"""Minecraft Java Edition for the tests of routes chosen by name: crafted handshakes
(`mc_handshake`, Forge `\\0FML\\0` suffixes included), a tiny server (`McUpstream`: status
with its own motd and ping, or login success) and clients (`mc_status`, `mc_login`).
Loopback only; every socket has a timeout."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

TIMEOUT = 5.0


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def mc_packet(packet_id: int, payload: bytes) -> bytes:
    body = varint(packet_id) + payload
    return varint(len(body)) + body


def mc_string(text: str) -> bytes:
    raw = text.encode()
    return varint(len(raw)) + raw


def mc_handshake(address: str, port: int, next_state: int) -> bytes:
    """A Java Edition handshake (protocol 767) for `address` (FML suffixes included)."""
    payload = varint(767) + mc_string(address) + port.to_bytes(2, "big") + varint(next_state)
    return mc_packet(0, payload)


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """(id, payload) of the next packet on `sock`."""
    length = shift = 0
    while True:
        byte = _exact(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    body = _exact(sock, length)
    packet_id = body[0]  # ids used here are below 128
    return packet_id, body[1:]


def _exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed mid-packet")
        data += chunk
    return data


class McUpstream:
    """A tiny Minecraft server: status (its `motd`) and ping, or login (success)."""

    def __init__(self, motd: str) -> None:
        self.motd = motd
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.addresses: list[bytes] = []  # each handshake's raw address, as received
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with contextlib.suppress(OSError), conn:
                conn.settimeout(TIMEOUT)
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        _, hs = read_packet(conn)
        size = hs[2]  # protocol 767 is a 2-byte VarInt; the address is under 128 bytes
        self.addresses.append(hs[3 : 3 + size])
        state = hs[-1]
        if state == 1:
            read_packet(conn)  # status request
            status = json.dumps({"description": {"text": self.motd}})
            conn.sendall(mc_packet(0, mc_string(status)))
            ping_id, payload = read_packet(conn)
            conn.sendall(mc_packet(ping_id, payload))
        else:
            _, login = read_packet(conn)
            size = login[0]
            user = login[1 : 1 + size]
            conn.sendall(mc_packet(2, bytes(16) + varint(len(user)) + user + varint(0)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.sock.close()


def mc_status(port: int, address: str) -> str:
    """The motd a status request through `port` for `address` gets, after a ping."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(mc_handshake(address, 25565, 1) + mc_packet(0, b""))
        _, payload = read_packet(sock)
        size_len = 1 if payload[0] < 0x80 else 2
        status = json.loads(payload[size_len:])
        sock.sendall(mc_packet(1, (1234).to_bytes(8, "big")))
        assert read_packet(sock) == (1, (1234).to_bytes(8, "big"))
        return str(status["description"]["text"])


def mc_login(port: int, address: str, user: str) -> str:
    """The user name a login through `port` for `address` is welcomed as."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(mc_handshake(address, 25565, 2) + mc_packet(0, mc_string(user) + bytes(16)))
        packet_id, payload = read_packet(sock)
        assert packet_id == 2
        return payload[17 : 17 + payload[16]].decode()
