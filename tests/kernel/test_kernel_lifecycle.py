"""Kernel routes over time: drain and cut, SIGKILL and restart, rebuild, close, scale.

All inside namespaces the tests create (tests/support/netns.py); the engine runs in an agent
process there, so killing it with SIGKILL is killing "labelproxy".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.kernellab import KernelLab, lab
from tests.support.netns import HOST_V4, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture
def k() -> Iterator[KernelLab]:
    yield from lab(drain_timeout=5.0)


def nft(k: KernelLab, *args: str) -> str:
    """Run `nft` in the lab's host namespace (never the host's own)."""
    done = subprocess.run(["ip", "netns", "exec", k.topology.host, "nft", *args],
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


def table_items(k: KernelLab) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(nft(k, "-j", "list", "table", "inet",
                                                 "labelproxy"))["nftables"]
    return items


def tcp(alias: str, port: int, upstream: int, **options: Any) -> dict[str, Any]:
    return {"alias": alias, "port": port, "backends": [["127.0.0.1", upstream]],
            "options": options}


def test_removed_route_stops_new_flows_at_once_and_is_cut_at_the_deadline(
    k: KernelLab,
) -> None:
    upstream = k.serve("tcp", 9101)
    k.serve("udp", 9102)
    udp_route = {"alias": "u", "scheme": "udp4", "port": 8102, "backends": [["127.0.0.1", 9102]]}
    k.apply(tcp("t", 8101, 9101), udp_route)
    established = k.connect(k.remote, HOST_V4, 8101)
    session = k.remote.call("udp_open", host=HOST_V4, port=8102)
    assert k.remote.call("udp_echo", sock=session) == {"replies": 1}

    k.apply()  # both routes gone; nobody holds their ports any more
    assert k.remote.call("connect", host=HOST_V4, port=8101) == {"error": "refused"}
    assert k.peers(upstream)["accepted"] == 1
    fresh = k.remote.call("udp_open", host=HOST_V4, port=8102)
    assert k.remote.call("udp_echo", sock=fresh, timeout=0.5) == {"replies": 0}
    # established flows drain through conntrack
    assert k.remote.call("echo", conn=established) == {"ok": True}
    assert k.remote.call("udp_echo", sock=session) == {"replies": 1}
    assert k.engine.call("engine_draining_active") == 2

    deadline = k.engine.call("engine_next_deadline")
    assert k.engine.call("engine_cut_expired", now=deadline - 0.5) == []
    cut = k.engine.call("engine_cut_expired", now=deadline)
    assert sorted(cut) == ["tcp://[::]:8101 t", "udp://0.0.0.0:8102 u"]
    assert k.remote.call("echo", conn=established) == {"error": "reset"}
    assert k.remote.call("udp_echo", sock=session, timeout=0.5) == {"replies": 0}
    assert k.engine.call("engine_next_deadline") is None


def test_sigkill_and_restart_adopt_the_table_and_cut_nothing(k: KernelLab) -> None:
    k.serve("tcp", 9111)
    k.serve("tcp", 9113)
    kept, dropped = tcp("kept", 8111, 9111, max_connections=2), tcp("dropped", 8113, 9113)
    k.apply(kept, dropped)
    established = k.connect(k.remote, HOST_V4, 8111)
    draining = k.connect(k.remote, HOST_V4, 8113)

    k.engine.kill()  # SIGKILL: no cleanup at all
    assert k.remote.call("echo", conn=established) == {"ok": True}
    k.connect(k.remote, HOST_V4, 8111)  # the table goes on forwarding new flows too

    k.engine = k.start_engine()
    assert k.outcome == "adopted"
    k.apply(kept)  # "dropped" did not come back
    assert k.remote.call("echo", conn=established) == {"ok": True}
    counters = k.counters()["tcp://[::]:8111"]
    assert (counters["connections"], counters["active"]) == (2, 2)  # kept across the restart
    # ct count's list survived the rewrite: the cap still sees both flows
    assert k.remote.call("connect", host=HOST_V4, port=8111) == {"error": "refused"}
    assert k.counters()["tcp://[::]:8111"]["rejected_limit"] == 1

    # the route that did not come back takes no new flows; its flow drains, then is cut
    assert k.remote.call("connect", host=HOST_V4, port=8113) == {"error": "refused"}
    assert k.remote.call("echo", conn=draining) == {"ok": True}
    deadline = k.engine.call("engine_next_deadline")
    assert k.engine.call("engine_cut_expired", now=deadline) == ["tcp://[::]:8113 dropped"]
    assert k.remote.call("echo", conn=draining) == {"error": "reset"}
    chains = {item["chain"]["name"] for item in table_items(k) if "chain" in item}
    assert {"r_1", "n_1"} <= chains and "r_2" not in chains and "n_2" not in chains


def test_a_table_of_another_layout_is_rebuilt(k: KernelLab) -> None:
    k.engine.kill()
    nft(k, "add", "table", "inet", "labelproxy")
    nft(k, "add", "chain", "inet", "labelproxy", "leftover")
    k.engine = k.start_engine()
    assert k.outcome == "rebuilt"
    k.serve("tcp", 9121)
    k.apply(tcp("web", 8121, 9121))
    chains = {item["chain"]["name"] for item in table_items(k) if "chain" in item}
    assert "leftover" not in chains and "r_1" in chains
    k.connect(k.remote, HOST_V4, 8121)


def test_close_removes_only_its_own_table_and_cuts_its_flows(k: KernelLab) -> None:
    nft(k, "add", "table", "inet", "other")
    nft(k, "add", "chain", "inet", "other", "input",
        "{ type filter hook input priority 0; policy accept; }")
    nft(k, "add", "rule", "inet", "other", "input", "tcp", "dport", "1", "counter")
    other = nft(k, "list", "table", "inet", "other")
    k.serve("tcp", 9131)
    k.apply(tcp("web", 8131, 9131))
    established = k.connect(k.remote, HOST_V4, 8131)
    assert k.host.call("sysctl", name="net.ipv4.conf.all.route_localnet") == "1"

    k.engine.call("engine_close")
    assert nft(k, "list", "tables").split() == ["table", "inet", "other"]
    assert nft(k, "list", "table", "inet", "other") == other
    assert k.remote.call("echo", conn=established) == {"error": "reset"}
    assert k.host.call("sysctl", name="net.ipv4.conf.all.route_localnet") == "0"


def test_close_keep_leaves_the_table_for_the_next_run(k: KernelLab) -> None:
    k.serve("tcp", 9141)
    k.apply(tcp("web", 8141, 9141))
    established = k.connect(k.remote, HOST_V4, 8141)
    k.engine.call("engine_close", keep=True)
    assert k.remote.call("echo", conn=established) == {"ok": True}
    k.engine = k.start_engine()
    assert k.outcome == "adopted"


def test_a_thousand_routes_apply_and_count_in_under_a_second(k: KernelLab) -> None:
    routes = [tcp(f"r{n}", 20_000 + n, 30_000 + n, max_connections=100) for n in range(1000)]
    first = k.apply(*routes)
    assert len(first["routes"]) == 1000
    again = k.apply(*routes)  # nothing changed: one no-op transaction
    moved = [*routes[:-1], tcp("r999", 20_999, 31_000)]
    one = k.apply(*moved)  # one route's backend changed
    counting = k.engine.call("engine_time_counters")
    assert counting["routes"] == 1000
    timings = {"first apply": first, "unchanged": again, "one backend changed": one,
               "counters": counting}
    print("\n1,000 kernel routes: " + ", ".join(
        f"{name} {t['seconds']:.3f}s wall / {t['cpu']:.3f}s CPU" for name, t in timings.items()))
    # CPU time (the engine's and nft's): wall time on a shared CI machine measures its load
    for name, t in timings.items():
        assert t["cpu"] < 1.0, (name, t)


def wait_for_active(k: KernelLab, key: str, want: int, *, deadline: float = 15.0) -> None:
    """Poll the route's live flows (conntrack) until `want`, or fail at the deadline."""
    until = time.monotonic() + deadline
    while (active := k.counters()[key]["active"]) != want:
        assert time.monotonic() < until, f"{key}: {active} live flows, expected {want}"
        time.sleep(0.2)


def test_idle_timeout_expires_udp_sessions_and_resets_idle_tcp(k: KernelLab) -> None:
    k.serve("udp", 9151)
    k.serve("tcp", 9152)
    k.apply({"alias": "u", "scheme": "udp4", "port": 8151, "backends": [["127.0.0.1", 9151]],
             "options": {"idle_timeout": 1.5}},
            tcp("t", 8152, 9152, idle_timeout=1.5))
    session = k.remote.call("udp_open", host=HOST_V4, port=8151)
    assert k.remote.call("udp_echo", sock=session) == {"replies": 1}
    idle = k.connect(k.remote, HOST_V4, 8152)
    assert k.counters()["udp://0.0.0.0:8151"]["active"] == 1
    assert k.counters()["tcp://[::]:8152"]["active"] == 1

    wait_for_active(k, "udp://0.0.0.0:8151", 0)  # ct timeout policy udp_2
    wait_for_active(k, "tcp://[::]:8152", 0)  # tcp_2: established for 2 s without a packet
    assert k.remote.call("echo", conn=idle) == {"error": "reset"}
    assert k.remote.call("udp_echo", sock=session) == {"replies": 1}  # a new session
    assert k.counters()["udp://0.0.0.0:8151"]["connections"] == 2



def test_probe_says_why_nftables_is_unusable_without_net_admin(k: KernelLab) -> None:
    probe = ("from labelproxy.kernel.nft import Nft; p = Nft().probe(); "
             "print('usable' if p is None else p)")
    argv = ["ip", "netns", "exec", k.topology.host, "setpriv", "--bounding-set", "-net_admin",
            "--inh-caps", "-net_admin", sys.executable, "-c", probe]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip().endswith("Operation not permitted")
    assert k.engine.call("engine_probe") is None  # the same namespace, with the capability
