"""Routes chosen by name (`hostnames`), the pure parts: reading the name from real first
bytes (Python's own ClientHello, crafted Minecraft handshakes), the table's matching order,
and the label rules (a name claimed twice, a plain route among named ones, UDP) as
`labelproxy check` reports them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from labelproxy.kernel.eligible import eligible
from labelproxy.lint.check import check_compose
from labelproxy.sources.containers import ContainerView, DiscoveryContext
from labelproxy.sources.desired import build_desired
from labelproxy.sources.routesfile import parse_routes
from labelproxy.spec import EdgePolicy, ListenKey
from labelproxy.streams.names.hello import PeekError
from labelproxy.streams.names.reader import HeaderRefusedError, NameReader
from labelproxy.streams.names.table import NameTable
from labelproxy.streams.proxyproto import build_header
from tests.support.minecraft import mc_handshake, mc_packet
from tests.support.names import tls_hello, two_records


def feed_all(chunks: list[bytes]) -> tuple[str, str] | None:
    reader = NameReader()
    for chunk in chunks:
        found = reader.feed(chunk)
        if found is not None:
            return found.protocol, found.name
    return None


def test_the_name_is_read_from_any_split_of_the_first_bytes() -> None:
    hello = tls_hello("a.example.com")[3]
    assert feed_all([hello[i : i + 1] for i in range(len(hello))]) == ("tls", "a.example.com")
    assert feed_all([two_records(hello)]) == ("tls", "a.example.com")
    assert feed_all([tls_hello(None)[3]]) == ("tls", "")
    mc = mc_handshake("Play.Example.com\0FML2\0", 25565, 2) + mc_packet(0, b"\x05steve")
    assert feed_all([mc[i : i + 1] for i in range(len(mc))]) == ("minecraft", "Play.Example.com")
    assert feed_all([hello[:-1]]) is None  # not whole yet: more is awaited


@pytest.mark.parametrize(
    "first",
    [
        os.urandom(1 << 20),  # garbage, as much as a client cares to send
        b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n",
        b"\x16\x03\x01\x00\x05\x01\xff\xff\xff\x00",  # a ClientHello claiming 16 MB
        b"\x15\x03\x03\x00\x02\x02\x28",  # an alert
        b"\x16\x03\x01" + b"\x40\x01" + bytes(0x4001),  # a record over 16 KiB
    ],
    ids=["1MB-random", "http", "huge-hello", "alert", "huge-record"],
)
def test_what_names_nothing_is_refused(first: bytes) -> None:
    with pytest.raises(PeekError):
        feed_all([first[i : i + 16384] for i in range(0, len(first), 16384)])


def test_exact_then_the_longest_wildcard_then_the_fallback() -> None:
    table = NameTable({"a.example.com": 1, "*.example.com": 2, "*.b.example.com": 3, "*": 4})
    assert [table.lookup(n) for n in ("A.Example.COM.", "x.example.com", "y.x.b.example.com",
                                      "example.com", "", "other.org")] == [1, 2, 3, 4, 4, 4]
    assert NameTable({"a.example.com": 1}).lookup("b.example.com") is None


def view(name: str, created: float, labels: dict[str, str]) -> ContainerView:
    return ContainerView(id=name, name=name, created=created, labels=labels,
                         networks={"app": f"10.0.0.{int(created)}"})  # fmt: skip


def test_label_rules_for_names_on_one_port() -> None:
    """Two names share 443; the same name again is a conflict (the first created keeps
    it); a route without hostnames there is a conflict; UDP with hostnames is a label
    error; the kernel leaves named routes to the relay."""
    state = build_desired([
        view("a", 1, {"proxy.web.port": "443", "proxy.web.hostnames": "A.test., *.a.test"}),
        view("b", 2, {"proxy.web.port": "443", "proxy.web.hostnames": "b.test"}),
        view("c", 3, {"proxy.web.port": "443", "proxy.web.hostnames": "b.test,c.test"}),
        view("d", 4, {"proxy.plain.port": "443"}),
        view("e", 5, {"proxy.dns.port": "53", "proxy.dns.scheme": "udp",
                      "proxy.dns.hostnames": "dns.test"}),
    ], DiscoveryContext())  # fmt: skip
    keys = {str(k): s.backends[0].container_name for k, s in state.routes.items()}
    assert keys == {"tcp://[::]:443#*.a.test,a.test": "a", "tcp://[::]:443#b.test": "b"}
    by_source = {p.source: (p.kind, p.message) for p in state.problems}
    assert by_source["c"] == ("conflict", "listen tcp://[::]:443: hostname b.test is already "
                              "held by route 'web' of container b")  # fmt: skip
    assert by_source["d"][0] == "conflict" and "needs hostnames too" in by_source["d"][1]
    assert by_source["e"][0] == "label" and "TCP only" in by_source["e"][1]
    spec = next(iter(state.routes.values()))
    assert eligible(spec, policy=EdgePolicy()).reason.startswith("hostnames")
    static, problems = parse_routes(
        "routes:\n  mqtt:\n    port: '8883'\n    host: 127.0.0.1:1883\n"
        "    hostnames: [mqtt.test, '*']\n", source="routes.yml")  # fmt: skip
    assert not problems and static[0].key == ListenKey("tcp", "::", 8883, ("*", "mqtt.test"))


def test_check_reports_a_name_claimed_twice(tmp_path: Path) -> None:
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        "services:\n"
        "  one:\n    image: x\n    labels:\n"
        "      proxy.db.port: '5432'\n      proxy.db.hostnames: db.test\n"
        "  two:\n    image: x\n    labels:\n"
        "      proxy.db2.port: '5432'\n      proxy.db2.hostnames: 'db.test, *'\n"
    )
    result = check_compose(compose, label_prefix="proxy", use_cli=False)
    assert [p.kind for p in result.problems] == ["conflict"]
    assert "hostname db.test is already held" in result.problems[0].message


def test_a_trusted_proxys_header_comes_before_the_name() -> None:
    """`required`: the PROXY header is read first and its addresses kept; `optional`: a
    client without one is read as it is; `required` without one is a header refusal."""
    hello = tls_hello("a.example.com")[3]
    header = build_header("v2", ("203.0.113.7", 4000), ("192.0.2.1", 443))
    found = NameReader(proxy_header="required").feed(header + hello)
    assert found is not None and found.source == ("203.0.113.7", 4000)
    assert found.name == "a.example.com" and found.data == hello
    optional = NameReader(proxy_header="optional").feed(hello)
    assert optional is not None and optional.name == "a.example.com" and optional.source is None
    with pytest.raises(HeaderRefusedError):
        NameReader(proxy_header="required").feed(hello)
