"""The data plane: the listeners of routes, relaying TCP connections and UDP sessions.

Streams never learn about Docker: the control plane (the reconciler, on the asyncio loop)
hands each listener a `live.LiveRoute` (the current `RouteSpec`, its counters, its policy)
and starts the engine for it, `tcp.serve_tcp` or `udp.serve_udp`; it swaps the spec in
place when only backends or options change, so the socket and its connections stay.

Who owns which thread:

    asyncio loop (control plane + UDP)           labelproxy-tcp thread (tcp/loop.py)
    ----------------------------------           -----------------------------------
    reconciler -> LiveRoute.update/close         DataLoop: one edge-triggered epoll
    serve_tcp: bind, hand over, drain -- call -> TcpServer: accept, admit, dial, relay
    tcp/setup.py tasks (PROXY header, names) -- submit -> TcpServer.open
    serve_udp + udp/relay.py: every UDP socket   (no asyncio, no task per connection)

A client connection -> bytes -> metrics (TCP; all on the data loop):

    tcp/accept.py  Acceptor: accept4, the client's and listener's addresses
    tcp/server.py  TcpServer: PROXY header trusted or not (LiveRoute.proxy_header), then
                   LiveRoute.admit: hooks.py (acl.py, caps, shared.py) decide; live.py counts
    tcp/dial.py    Connector: steps, backend pick, non-blocking connect with failover
    tcp/relay.py   Relay + tcp/pump.py Half per direction: copy or splice (tcp/splice.py);
                   bytes are added to the conn and the route's counters as they move
    tcp/server.py  TcpServer.ended: LiveRoute.release counts the close, accesslog.py writes
                   its record, drain.py is told
    metrics.py     reads the counters at scrape time (RouteCounters: one writer each)

A UDP datagram takes the same stations on the asyncio loop: udp/relay.py UdpRelay (or
udp/batched.py with recvmmsg/sendmmsg, udp/mmsg.py), LiveRoute.admit for a new source's
session (udp/session.py), counters per batch, LiveRoute.release and the access log when
the session ends. Both transports stop through the one drain (drain.py).

The modules: `live` (LiveRoute, the one place that counts a route's connections), `hooks`
(policy: ACL, caps, extras; they decide, never count), `acl`, `shared` (process-wide caps,
our own listeners), `proxyproto` (PROXY v1/v2 framing), `addresses` (the one parser and
IPv4-mapped unwrapping of addresses), `sockets` (binding by family, accept back-off, shared
with the HTTP endpoints), `accesslog`, `drain`; `tcp/`: `server`, `owner` (the one contract
between the server and its connections), `accept`, `setup`, `dial`, `deadlines`, `relay`,
`pump`, `splice`, `loop`, `hold` (wait for a ready backend), `wakehold` (hold while the
route's container wakes); `udp/`: `server`, `relay`, `batched`, `mmsg`, `session`,
`sockets`, `wakequeue` (queue a new client's datagrams while its container wakes); `wakeup`
(the `Waker` they ask: implemented by `sources.sleeper`, never imported here). (`pump`
holds what was the relay's mixin and its direction state: the relay
is one class that drives a `Half` per direction; `owner` and `deadlines` are modules of
their own so the server, the dial and the relay import each other in one direction only.)

Room to grow, each one new module plugged in at one place:
- Hold (wake a sleeping container: `tcp/wakehold.py`; wait up to the connect timeout for a
  ready backend: `tcp/hold.py`):
  a `dial.Step` that parks the `Connector` (its client fd stays open and counted; a drain
  waits for it, a shutdown aborts it) and calls `proceed()` when a backend is ready;
  listed in `tcp.server.TcpServer._steps_of` for the routes that want it. UDP holds
  datagrams the same way while a name resolves (`UdpSession.pending`).
- Peek (route by TLS ClientHello SNI or a game handshake): built as `tcp/names.py`, a
  listener shared by the routes with `hostnames` on one port (`NameGroup`), which reads the
  name on the data loop (`names/`: `reader`, `hello`, `minecraft`, `table`) before any
  route is chosen, then hands the client and the bytes read to the chosen route's own
  `TcpServer` (`hand`: admit, dial, relay the bytes first), whose door is its table entry.
- A second engine (kernel forwarding with nftables, beside `streams/`): a `live.Serve`
  function honouring the same `LiveRoute` contract (bind or install, "started", serve
  until `close()`, drain, `finished`), chosen per route where the reconciler picks
  `serve_tcp`/`serve_udp`; it reports into the same `RouteCounters` where it can measure.
"""
