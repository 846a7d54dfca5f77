"""Process-wide caps (`LABELPROXY_MAX_CONNECTIONS`, `LABELPROXY_UDP_MAX_SESSIONS_TOTAL`):
across every route, new connections / sessions beyond the cap are refused with reason
`limit` while the existing ones keep flowing; a freed slot is reusable on any route.

Real loopback sockets; two routes share one `SharedState`, as every route of a process does.
"""

from __future__ import annotations

from typing import Any

import pytest

from labelproxy.settings import SettingsError, auto_limit, load_settings
from labelproxy.streams.shared import SharedState
from tests.support import tcp, udp

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"use_uvloop": True})


async def test_tcp_cap_across_two_routes_refuses_new_and_keeps_existing() -> None:
    shared = SharedState(max_connections=2, udp_max_sessions_total=None)
    async with (
        tcp.upstream() as up,
        tcp.running_route(tcp.tcp_spec(up.port, alias="a"), shared=shared) as a,
        tcp.running_route(tcp.tcp_spec(up.port, alias="b"), shared=shared) as b,
    ):
        a1 = await tcp.connect(a)
        b1 = await tcp.connect(b)
        assert await tcp.ping(a1) == b"ping"
        assert await tcp.ping(b1) == b"ping"
        for live in (a, b):  # the third connection, on either route, is refused
            extra = await tcp.connect(live)
            async with extra:
                assert await tcp.recv_until_eof(extra) == b""
        await tcp.wait_for(
            lambda: a.counters.rejected["limit"] == b.counters.rejected["limit"] == 1
        )
        assert await tcp.ping(a1, b"still here") == b"still here"
        assert await tcp.ping(b1, b"still here") == b"still here"
        assert len(up.peers) == 2
        await a1.aclose()  # a slot freed on route a serves route b
        await tcp.wait_for(lambda: shared.tcp_cap.open == 1)
        b2 = await tcp.connect(b)
        async with b1, b2:
            assert await tcp.ping(b2) == b"ping"
            assert await tcp.ping(b1) == b"ping"


@pytest.mark.parametrize("path", udp.RELAY_PATHS)
async def test_udp_session_cap_across_two_routes_drops_new_sources_only(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    udp.use_relay_path(monkeypatch, path)
    shared = SharedState(max_connections=None, udp_max_sessions_total=2)
    async with (
        udp.udp_upstream() as up,
        udp.running_route(udp.udp_spec(up.port), shared=shared) as a,
        udp.running_route(udp.udp_spec(up.port), shared=shared) as b,
        udp.client_of(a) as a1,
        udp.client_of(b) as b1,
        udp.client_of(a) as a2,
    ):
        assert await udp.ask(a1, b"a1") == b"a1"
        assert await udp.ask(b1, b"b1") == b"b1"
        await a2.send(b"over the cap")
        # route a handles datagrams in arrival order: once a1's reply is back, a2's was seen
        assert await udp.ask(a1, b"a1 again") == b"a1 again"
        assert a.counters.udp_dropped["limit"] == 1
        assert await udp.ask(b1, b"b1 again") == b"b1 again"
        assert shared.udp_cap.open == 2
        assert b"over the cap" not in {data for data, _ in up.received}


@pytest.mark.parametrize(
    ("open_files", "cap"),
    [
        (1024, 128),  # half kept back: (1024 - 512) / 4
        (20_000, 4375),  # an eighth kept back: (20000 - 2500) / 4
        (1_048_576, 229_376),
    ],
)
def test_auto_caps_leave_room_for_the_control_plane(open_files: int, cap: int) -> None:
    assert auto_limit(open_files) == cap
    # both transports at their caps: 2 sockets per connection, 1 per session
    assert 3 * cap <= open_files - open_files // 8


def test_settings_give_the_caps_to_the_data_plane() -> None:
    auto = load_settings({}).edge_policy(open_files=20_000)
    assert (auto.max_connections, auto.udp_max_sessions_total) == (4375, 4375)
    explicit = load_settings(
        {"LABELPROXY_MAX_CONNECTIONS": "100", "LABELPROXY_UDP_MAX_SESSIONS_TOTAL": "auto"}
    ).edge_policy(open_files=20_000)
    assert (explicit.max_connections, explicit.udp_max_sessions_total) == (100, 4375)


@pytest.mark.parametrize(
    "name", ["LABELPROXY_MAX_CONNECTIONS", "LABELPROXY_UDP_MAX_SESSIONS_TOTAL"]
)
@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5"])
def test_a_bad_cap_is_one_line_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({name: value})
    message = str(info.value)
    assert "\n" not in message
    assert name in message and repr(value) in message
    assert "positive whole number or auto" in message
