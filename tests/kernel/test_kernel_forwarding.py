"""Kernel forwarding end to end, inside namespaces the tests create (tests/support/netns.py).

Upstreams listen in the "host" namespace on 127.0.0.1 (like host-network containers) or on
the host's own address; clients connect from the remote namespace (192.0.2.2, 2001:db8::2) and
from inside the host namespace (loopback). The engine runs in its own agent process there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.kernellab import KernelLab, lab
from tests.support.lp import wait_for
from tests.support.netns import (
    BRIDGE_HOST,
    BRIDGED,
    CLIENT_V4,
    CLIENT_V6,
    HOST_V4,
    HOST_V6,
    ROUTED,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def k() -> Iterator[KernelLab]:
    yield from lab()


def test_tcp_forwarded_from_remote_and_loopback_upstream_sees_the_client(k: KernelLab) -> None:
    upstream = k.serve("tcp", 9001)
    result = k.apply({"alias": "web", "port": 8001, "backends": [["127.0.0.1", 9001]]})
    route = result["routes"]["tcp://[::]:8001"]
    assert route["families"] == ["ipv4"] and route["client_address_hidden"] is False
    k.host.call("reserve", transport="tcp", bind="::", port=8001)

    k.connect(k.remote, HOST_V4, 8001)
    k.connect(k.host, "127.0.0.1", 8001)
    k.connect(k.host, HOST_V4, 8001)

    seen = k.peers(upstream)
    assert seen["accepted"] == 3
    assert seen["peers"] == [CLIENT_V4, "127.0.0.1", HOST_V4]
    # the remote client reached a 127.0.0.1 upstream: route_localnet was switched on for it
    assert k.host.call("sysctl", name="net.ipv4.conf.all.route_localnet") == "1"


def test_udp_forwarded_from_remote_and_loopback(k: KernelLab) -> None:
    upstream = k.serve("udp", 9002)
    k.apply({"alias": "dns", "scheme": "udp4", "port": 8002, "backends": [["127.0.0.1", 9002]]})
    k.host.call("reserve", transport="udp", bind="0.0.0.0", port=8002)

    remote = k.remote.call("udp_open", host=HOST_V4, port=8002)
    local = k.host.call("udp_open", host="127.0.0.1", port=8002)
    assert k.remote.call("udp_echo", sock=remote, count=3) == {"replies": 3}
    assert k.host.call("udp_echo", sock=local, count=3) == {"replies": 3}
    assert k.peers(upstream)["peers"] == [CLIENT_V4, "127.0.0.1"]


def test_ipv6_route_to_a_local_address_upstream_sees_the_client(k: KernelLab) -> None:
    upstream = k.serve("tcp", 9003, host=HOST_V6)
    result = k.apply({"alias": "v6", "scheme": "tcp6", "port": 8003,
                      "backends": [[HOST_V6, 9003]]})
    assert result["routes"]["tcp://[::]:8003"]["families"] == ["ipv6"]
    k.host.call("reserve", transport="tcp", bind="::", port=8003, v6only=True)

    k.connect(k.remote, HOST_V6, 8003)
    assert k.peers(upstream)["peers"] == [CLIENT_V6]


def test_acl_deny_refuses_the_client_and_counts_it(k: KernelLab) -> None:
    k.serve("tcp", 9004)
    k.apply({"alias": "acl", "port": 8004, "backends": [["127.0.0.1", 9004]],
             "options": {"deny": [f"{CLIENT_V4}/32"]}})
    k.host.call("reserve", transport="tcp", bind="::", port=8004)

    assert k.remote.call("connect", host=HOST_V4, port=8004) == {"error": "refused"}
    k.connect(k.host, "127.0.0.1", 8004)  # everyone else passes

    counters = k.counters()["tcp://[::]:8004"]
    assert counters["rejected_acl"] == 1
    assert counters["connections"] == 1


def test_allow_list_refuses_everyone_else(k: KernelLab) -> None:
    k.serve("udp", 9005)
    k.apply({"alias": "allow", "scheme": "udp4", "port": 8005,
             "backends": [["127.0.0.1", 9005]], "options": {"allow": ["127.0.0.0/8"]}})

    remote = k.remote.call("udp_open", host=HOST_V4, port=8005)
    local = k.host.call("udp_open", host="127.0.0.1", port=8005)
    assert k.remote.call("udp_echo", sock=remote, count=2, timeout=0.5) == {"replies": 0}
    assert k.host.call("udp_echo", sock=local, count=2) == {"replies": 2}
    assert k.counters()["udp://0.0.0.0:8005"]["rejected_acl"] == 2


def test_max_connections_is_enforced_with_ct_count(k: KernelLab) -> None:
    k.serve("tcp", 9006)
    k.apply({"alias": "capped", "port": 8006, "backends": [["127.0.0.1", 9006]],
             "options": {"max_connections": 2}})
    k.host.call("reserve", transport="tcp", bind="::", port=8006)

    first = k.connect(k.remote, HOST_V4, 8006)
    k.connect(k.remote, HOST_V4, 8006)
    assert k.remote.call("connect", host=HOST_V4, port=8006) == {"error": "refused"}
    assert k.counters()["tcp://[::]:8006"]["rejected_limit"] == 1
    assert k.counters()["tcp://[::]:8006"]["active"] == 2

    k.remote.call("close", conn=first)  # its conntrack entry leaves ESTABLISHED: a slot frees
    # the FIN exchange is the kernel's, not this call's: wait for the count to show it
    wait_for(lambda: k.counters()["tcp://[::]:8006"]["active"] == 1, timeout=10.0,
             what="the closed connection's slot freed")  # fmt: skip
    k.connect(k.remote, HOST_V4, 8006)
    counters = k.counters()["tcp://[::]:8006"]
    assert (counters["connections"], counters["rejected_limit"]) == (3, 1)


def test_round_robin_alternates_and_source_hash_sticks(k: KernelLab) -> None:
    one, two = k.serve("tcp", 9011), k.serve("tcp", 9012)
    pool = [["127.0.0.1", 9011], ["127.0.0.1", 9012]]
    k.apply({"alias": "rr", "port": 8010, "backends": pool},
            {"alias": "sh", "port": 8020, "backends": pool,
             "options": {"load_balance": "source_hash"}})
    for _ in range(4):
        k.connect(k.remote, HOST_V4, 8010)
    assert (k.peers(one)["accepted"], k.peers(two)["accepted"]) == (2, 2)

    for _ in range(4):
        k.connect(k.remote, HOST_V4, 8020)
    counts = sorted((k.peers(one)["accepted"] - 2, k.peers(two)["accepted"] - 2))
    assert counts == [0, 4]


def test_backend_change_leaves_established_flows_alone(k: KernelLab) -> None:
    old, new = k.serve("tcp", 9021), k.serve("tcp", 9022)
    k.apply({"alias": "move", "port": 8021, "backends": [["127.0.0.1", 9021]]})
    established = k.connect(k.remote, HOST_V4, 8021)

    k.apply({"alias": "move", "port": 8021, "backends": [["127.0.0.1", 9022]]})
    assert k.remote.call("echo", conn=established) == {"ok": True}
    k.connect(k.remote, HOST_V4, 8021)
    assert (k.peers(old)["accepted"], k.peers(new)["accepted"]) == (1, 1)
    assert k.counters()["tcp://[::]:8021"]["connections"] == 2  # same route, same counters


def test_no_backend_refuses_and_counts(k: KernelLab) -> None:
    k.apply({"alias": "empty", "port": 8030, "backends": []})
    assert k.remote.call("connect", host=HOST_V4, port=8030) == {"error": "refused"}
    counters = k.counters()["tcp://[::]:8030"]
    assert (counters["rejected_no_backend"], counters["connections"]) == (1, 0)


def test_counters_match_the_traffic(k: KernelLab) -> None:
    k.serve("udp", 9040)
    k.serve("tcp", 9041)
    k.apply({"alias": "u", "scheme": "udp4", "port": 8040, "backends": [["127.0.0.1", 9040]]},
            {"alias": "t", "scheme": "tcp4", "port": 8041, "backends": [["127.0.0.1", 9041]]})
    sock = k.remote.call("udp_open", host=HOST_V4, port=8040)
    assert k.remote.call("udp_echo", sock=sock, size=500, count=7) == {"replies": 7}
    conns = [k.connect(k.remote, HOST_V4, 8041) for _ in range(3)]
    for conn in conns:
        assert k.remote.call("echo", conn=conn, size=20_000) == {"ok": True}

    local = k.host.call("udp_open", host="127.0.0.1", port=8040)  # counted once, not twice
    assert k.host.call("udp_echo", sock=local, size=500, count=3) == {"replies": 3}

    udp = k.counters()["udp://0.0.0.0:8040"]
    # one datagram is one IPv4 packet: 20 bytes of IP header + 8 of UDP + the payload
    assert (udp["connections"], udp["active"]) == (2, 2)
    assert (udp["packets_in"], udp["packets_out"]) == (10, 10)
    assert udp["bytes_in"] == udp["bytes_out"] == 10 * (500 + 28)

    tcp = k.counters()["tcp://0.0.0.0:8041"]
    payload = 3 * (1000 + 20_000)  # connect() echoes 1000 bytes once, then 20,000
    assert (tcp["connections"], tcp["active"]) == (3, 3)
    for way in ("in", "out"):
        packets, octets = tcp[f"packets_{way}"], tcp[f"bytes_{way}"]
        assert packets >= 3 * 2  # at least SYN (or SYN-ACK) and one data segment each
        # IP bytes = payload + 40..120 bytes of IPv4 and TCP headers per packet
        assert payload + 40 * packets <= octets <= payload + 120 * packets, (way, tcp)


def test_a_bridged_upstream_sees_the_client_and_a_routed_one_is_masqueraded(
    k: KernelLab,
) -> None:
    bridged = k.topology.agent(k.topology.add_bridged())
    routed = k.topology.agent(k.topology.add_routed())
    near = bridged.call("serve", transport="tcp", host=BRIDGED, port=9050)
    far = routed.call("serve", transport="tcp", host=ROUTED, port=9051)
    result = k.apply(
        {"alias": "near", "scheme": "tcp4", "port": 8050, "backends": [[BRIDGED, 9050]]},
        {"alias": "far", "scheme": "tcp4", "port": 8051, "backends": [[ROUTED, 9051]]},
    )
    assert result["routes"]["tcp://0.0.0.0:8050"]["client_address_hidden"] is False
    assert result["routes"]["tcp://0.0.0.0:8051"]["client_address_hidden"] is True

    k.connect(k.remote, HOST_V4, 8050)
    k.connect(k.remote, HOST_V4, 8051)
    assert bridged.call("peers", server=near)["peers"] == [CLIENT_V4]
    assert routed.call("peers", server=far)["peers"] == ["198.51.100.1"]  # this host
    # a loopback client cannot be the source on the bridge: masqueraded to the bridge address
    k.connect(k.host, "127.0.0.1", 8050)
    assert bridged.call("peers", server=near)["peers"] == [CLIENT_V4, BRIDGE_HOST]


def test_a_backend_beyond_this_host_needs_forwarding_switched_on(k: KernelLab) -> None:
    routed = k.topology.agent(k.topology.add_routed())
    routed.call("serve", transport="tcp", host=ROUTED, port=9052)
    far = {"alias": "far", "scheme": "tcp4", "port": 8052, "backends": [[ROUTED, 9052]]}
    result = k.apply(far)
    assert result["refused"] == {
        "tcp://0.0.0.0:8052": f"backend {ROUTED}:9052 is not on this host and IPv4 forwarding "
                              "is off in labelproxy's network namespace"}
    k.host.call("sysctl", name="net.ipv4.ip_forward", value="1")
    assert "tcp://0.0.0.0:8052" in k.apply(far)["routes"]
    k.connect(k.remote, HOST_V4, 8052)


def test_dual_stack_route_sends_each_family_to_its_own_backends(k: KernelLab) -> None:
    v4, v6 = k.serve("udp", 9060), k.serve("udp", 9061, host=HOST_V6)
    result = k.apply({"alias": "dual", "scheme": "udp", "port": 8060,
                      "backends": [["127.0.0.1", 9060], [HOST_V6, 9061]]})
    assert result["routes"]["udp://[::]:8060"]["families"] == ["ipv4", "ipv6"]
    for host in (HOST_V4, HOST_V6):
        sock = k.remote.call("udp_open", host=host, port=8060)
        assert k.remote.call("udp_echo", sock=sock) == {"replies": 1}
    assert (k.peers(v4)["peers"], k.peers(v6)["peers"]) == ([CLIENT_V4], [CLIENT_V6])


def test_clients_the_kernel_does_not_carry_reach_the_socket_labelproxy_holds(
    k: KernelLab,
) -> None:
    upstream = k.serve("tcp", 9070)
    relay = k.serve("tcp", 8070, host="::")  # stands in for the relay's dual-stack listener
    result = k.apply({"alias": "web", "port": 8070, "backends": [["127.0.0.1", 9070]]})
    assert result["routes"]["tcp://[::]:8070"]["uncovered"] == ["ipv6"]
    k.connect(k.remote, HOST_V4, 8070)  # IPv4: the kernel, to the upstream
    k.connect(k.remote, HOST_V6, 8070)  # IPv6 (no IPv6 backend): the relay's socket
    assert k.peers(upstream)["peers"] == [CLIENT_V4]
    assert k.peers(relay)["peers"] == [CLIENT_V6]
