"""The bytes of the named probes: each request, and a judge of the answer (pure: no I/O).

A `Protocol` says what to send (`request(host, port)`) and how to judge what came back:
`judge(answer)` returns `None` while more bytes are needed, else a `Verdict` (up or not, and a
short detail for `/routes` and the logs). Over TCP the answer is everything read so far; over
UDP it is one datagram (a `None` there means "not ours, keep waiting").

The messages are tiny and fixed, so they are built here with `struct` rather than with a
client library (redis-py, dnspython, paho-mqtt, mcstatus, asyncpg): those are large, bring
their own I/O and connection handling, and would each be a new dependency for 10-40 bytes.
Sources: RESP (redis), RFC 1035 section 4.1 (dns, over TCP with the two-byte length of section
4.2.2), the Minecraft Java "Server List Ping" (handshake + status request), RFC 4253 section
4.2 (ssh), the PostgreSQL frontend/backend protocol's SSLRequest, MQTT 3.1.1 sections 3.1/3.2.
"""

from __future__ import annotations

import json
import logging
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

from labelproxy.healthcheck import Kind, Transport

logger = logging.getLogger(__name__)

MAX_ANSWER = 256 * 1024  # bytes read at most before a TCP answer is judged too long


@dataclass(frozen=True, slots=True)
class Verdict:
    up: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Exchange:
    """One probe's request and the judge of its answer."""

    request: bytes
    judge: Callable[[bytes], Verdict | None]


def exchange_for(kind: Kind, *, host: str, port: int, transport: Transport) -> Exchange:
    """The request and judge of named probe `kind` against `host:port` over `transport`."""
    if kind == "redis":
        return Exchange(REDIS_PING, judge_redis)
    if kind == "dns":
        query_id = secrets.randbelow(0x10000)
        query = dns_query(query_id)
        if transport == "tcp":
            return Exchange(struct.pack("!H", len(query)) + query, _judge_dns_tcp(query_id))
        return Exchange(query, _judge_dns_udp(query_id))
    if kind == "minecraft":
        return Exchange(minecraft_status_request(host, port), judge_minecraft)
    if kind == "ssh":
        return Exchange(b"", judge_ssh)
    if kind == "postgres":
        return Exchange(POSTGRES_SSL_REQUEST, judge_postgres)
    if kind == "mqtt":
        return Exchange(MQTT_CONNECT, judge_mqtt)
    raise ValueError(f"{kind} is not a named probe")


def preview(data: bytes, limit: int = 40) -> str:
    """A short printable form of an unexpected answer, for the detail of a failed check."""
    shown = repr(data[:limit])
    return shown + ("..." if len(data) > limit else "")


# -- redis: PING answered by +PONG ------------------------------------------------------------
REDIS_PING = b"*1\r\n$4\r\nPING\r\n"


def judge_redis(answer: bytes) -> Verdict | None:
    """`+PONG` is up, and so is `-NOAUTH` (a live server that wants a password); any other
    error (`-LOADING`, `-MASTERDOWN`, `-BUSY`...) is down."""
    if not answer:
        return None
    if answer[:1] not in (b"+", b"-"):
        return Verdict(False, f"not a redis answer: {preview(answer)}")
    line, sep, _ = answer.partition(b"\r\n")
    if not sep:
        return (
            Verdict(False, f"not a redis answer: {preview(answer)}") if len(answer) > 512 else None
        )
    if line == b"+PONG":
        return Verdict(True, "+PONG")
    if line.startswith(b"-NOAUTH"):
        return Verdict(True, "redis answers (authentication required)")
    return Verdict(False, f"redis answered {preview(line)}")


# -- dns: a query for `.` NS; any well-formed answer with our ID ------------------------------
_DNS_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def dns_query(query_id: int) -> bytes:
    """A standard query (no recursion wanted) for the root's NS records."""
    header = struct.pack("!HHHHHH", query_id, 0x0000, 1, 0, 0, 0)
    return header + b"\x00" + struct.pack("!HH", 2, 1)  # name ".", QTYPE NS, QCLASS IN


def judge_dns_message(message: bytes, query_id: int) -> Verdict | None:
    """Up for a response (QR set) to our ID with any RCODE; None for someone else's ID."""
    if len(message) < 12:
        return Verdict(False, f"not a DNS message: {preview(message)}")
    answer_id, flags = struct.unpack("!HH", message[:4])
    if answer_id != query_id:
        return None
    if not flags & 0x8000:
        return Verdict(False, "not a DNS response (QR bit clear)")
    rcode = flags & 0x000F
    return Verdict(True, f"dns {_DNS_RCODES.get(rcode, f'RCODE {rcode}')}")


def _judge_dns_udp(query_id: int) -> Callable[[bytes], Verdict | None]:
    return lambda datagram: judge_dns_message(datagram, query_id)


def _judge_dns_tcp(query_id: int) -> Callable[[bytes], Verdict | None]:
    def judge(answer: bytes) -> Verdict | None:
        if len(answer) < 2:
            return None
        (length,) = struct.unpack("!H", answer[:2])
        if len(answer) < 2 + min(length, 12):
            return None
        verdict = judge_dns_message(answer[2 : 2 + length], query_id)
        return verdict or Verdict(False, f"not an answer to our DNS query: {preview(answer)}")

    return judge


# -- minecraft (Java edition): handshake + status request, a JSON status back ------------------
def varint(value: int) -> bytes:
    """Minecraft's VarInt: 7 bits a byte, least significant first, two's complement 32 bit."""
    value &= 0xFFFFFFFF
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None when `data` ends inside it; ValueError if > 5 bytes."""
    value = 0
    for shift in range(5):
        if pos + shift >= len(data):
            return None
        byte = data[pos + shift]
        value |= (byte & 0x7F) << (7 * shift)
        if not byte & 0x80:
            if value & 0x80000000:
                value -= 1 << 32
            return value, pos + shift + 1
    raise ValueError("VarInt longer than 5 bytes")


def _packet(packet_id: int, payload: bytes) -> bytes:
    body = varint(packet_id) + payload
    return varint(len(body)) + body


def minecraft_status_request(host: str, port: int) -> bytes:
    """Handshake (protocol -1 = "pinging to find the version", next state 1 = status), then
    the empty status request."""
    address = host.encode("utf-8")[:255]
    handshake = varint(-1) + varint(len(address)) + address + struct.pack("!H", port) + varint(1)
    return _packet(0x00, handshake) + _packet(0x00, b"")


def judge_minecraft(answer: bytes) -> Verdict | None:
    """Up for a status response packet (id 0) whose string is a JSON object."""
    try:
        head = read_varint(answer, 0)
        if head is None:
            return None
        length, pos = head
        if length < 1 or length > MAX_ANSWER:
            return Verdict(False, f"not a minecraft status packet: {preview(answer)}")
        if len(answer) < pos + length:
            return None
        body = answer[pos : pos + length]
        packet = read_varint(body, 0)
        if packet is None or packet[0] != 0:
            return Verdict(False, f"not a minecraft status response: {preview(answer)}")
        text_head = read_varint(body, packet[1])
        if text_head is None or text_head[1] + text_head[0] > len(body):
            return Verdict(False, "minecraft status string longer than its packet")
        status = json.loads(body[text_head[1] : text_head[1] + text_head[0]])
    except (ValueError, UnicodeDecodeError):
        return Verdict(False, f"not a minecraft status response: {preview(answer)}")
    if not isinstance(status, dict):
        return Verdict(False, "minecraft status is not a JSON object")
    version = status.get("version")
    name = version.get("name") if isinstance(version, dict) else None
    return Verdict(True, f"minecraft {name}" if isinstance(name, str) else "minecraft status")


# -- ssh: the server's identification line ----------------------------------------------------
def judge_ssh(answer: bytes) -> Verdict | None:
    """Up when an identification line starts `SSH-2.0-` (or `SSH-1.99-`, 2.0 compatible);
    RFC 4253 lets a server send other lines first."""
    lines = answer.split(b"\n")
    for line in lines[:-1]:
        if line.startswith(b"SSH-"):
            version = line.rstrip(b"\r")
            if version.startswith((b"SSH-2.0-", b"SSH-1.99-")):
                return Verdict(True, version[:64].decode("ascii", "replace"))
            return Verdict(False, f"not an SSH 2 server: {preview(version)}")
    if len(answer) > 8192 or len(lines) > 20:
        return Verdict(False, f"no SSH identification line: {preview(answer)}")
    return None


# -- postgres: SSLRequest answered by one byte, S or N ----------------------------------------
POSTGRES_SSL_REQUEST = struct.pack("!II", 8, 80877103)


def judge_postgres(answer: bytes) -> Verdict | None:
    if not answer:
        return None
    if answer == b"S":
        return Verdict(True, "postgres (SSL available)")
    if answer == b"N":
        return Verdict(True, "postgres (no SSL)")
    return Verdict(False, f"not a postgres answer to SSLRequest: {preview(answer)}")


# -- mqtt 3.1.1: CONNECT answered by CONNACK ---------------------------------------------------
def _mqtt_connect() -> bytes:
    variable = b"\x00\x04MQTT" + bytes([4, 0x02]) + struct.pack("!H", 30)  # clean session
    payload = b"\x00\x00"  # empty client id: the broker assigns one (3.1.1, 3.1.3.1)
    body = variable + payload
    return bytes([0x10, len(body)]) + body


MQTT_CONNECT = _mqtt_connect()
MQTT_DISCONNECT = b"\xe0\x00"
_CONNACK_CODES = {
    0: "accepted", 1: "unacceptable protocol version", 2: "identifier rejected",
    3: "server unavailable", 4: "bad user name or password", 5: "not authorized",
}  # fmt: skip


def judge_mqtt(answer: bytes) -> Verdict | None:
    """Up for a CONNACK with any return code except 3 (server unavailable): a broker that
    refuses an anonymous client still answers."""
    if not answer:
        return None
    if answer[0] != 0x20:
        return Verdict(False, f"not an MQTT CONNACK: {preview(answer)}")
    if len(answer) < 4:
        return None
    if answer[1] != 2:
        return Verdict(False, f"malformed MQTT CONNACK: {preview(answer)}")
    code = answer[3]
    meaning = _CONNACK_CODES.get(code, f"code {code}")
    return Verdict(code != 3, f"mqtt CONNACK {meaning}")
