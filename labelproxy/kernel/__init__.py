"""Kernel forwarding: routes the kernel can carry are forwarded by nftables, not by the relay.

This package depends only on `labelproxy.spec`, the standard library, pyroute2 (conntrack and
route lookups over netlink) and the `nft` program (Debian's `nftables`, JSON in and out). It
is not wired into the runtime yet; this docstring says how it is meant to be.

Modules
    eligible    pure: `eligible(spec, policy=EdgePolicy) -> Verdict(kernel, reason, families,
                uncovered)`; `reason` is the one line for `/routes` and the log
    model       `KernelRoute` (a spec plus slot/mark, families, masquerade, limit, timeout),
                `route_identity`, and `Table`, the model of labelproxy's nftables table
    exprs       builders of nftables JSON expressions
    routerules  pure: one route's chains, sets and elements (`fragment`)
    ruleset     pure: the whole table for a set of `KernelRoute`s (`build`); its docstring
                shows the layout of table `inet labelproxy`
    transaction pure: `transaction(old, new) -> Transaction`, the minimal atomic change
    nft         `Nft`: runs transactions (`nft -j -f -`), reads the table and its counters
    conntrack   pyroute2: live flows per route mark, deleting a route's flows
    host        route lookups (does a backend's reply come back here?), sysctls
    engine      `KernelEngine`, the only class the runtime needs

API (all blocking: call from a worker thread, e.g. `anyio.to_thread.run_sync`)
    engine = KernelEngine(policy=edge_policy)
    engine.probe() -> str | None          why nftables is unusable here (None: usable)
    engine.start() -> "created" | "adopted" | "rebuilt"   reads the table a previous run left
    engine.assess(spec) -> Verdict         eligibility plus host facts (IP forwarding)
    engine.apply(specs) -> ApplyResult     the complete set of kernel routes, idempotent;
                                           .routes: key -> RouteState (slot, mark, families,
                                           uncovered, client_address_hidden, limit,
                                           idle_timeout); .refused: key -> reason
    engine.counters() -> {key: RouteCounters}   connections, active, packets_in/out,
                                           bytes_in/out (IP bytes), rejected{acl, limit,
                                           no_backend}
    engine.next_deadline() / engine.cut_expired(now=None)   drain deadlines of removed routes
    engine.draining_active() -> int        live flows of removed routes (shutdown can stop
                                           waiting at 0)
    engine.close(keep=False)               table removed, flows cut, route_localnet restored;
                                           keep=True leaves everything for the next run

Limits (the relay has none of these; `/routes` and the README should say so)
    - The upstream sees the client's own address only where replies come back through this
      host (local addresses, backends on a local bridge or veth); elsewhere the route
      masquerades (`client_address_hidden`). Clients on the same bridge as the backend that
      reach the route through this host are not masqueraded yet (replies would bypass it).
    - Forwarded flows (backends that are not local addresses) need IP forwarding on, and pass
      the host firewall's forward chains (Docker's DOCKER/FORWARD rules included) like any
      routed packet: a drop there is a drop.
    - IPv6 loopback clients (::1) cannot be sent to a non-loopback IPv6 backend (IPv6 has no
      route_localnet); IPv4 ones are masqueraded to the outgoing address.
    - Remote clients of a loopback backend and loopback clients of any other backend need
      net.ipv4.conf.all.route_localnet=1, which the engine switches on. Where it may not (a
      container's read-only /proc/sys), routes that need it are refused (left to the relay)
      with the reason, unless it is already on (set on the host).
    - TCP refusals (ACL, cap, no backend) are resets: the client sees "connection refused"
      where the relay accepts and closes. UDP refusals are silent drops.
    - idle_timeout ends a TCP flow by forgetting it (as drain cuts do): the client's next
      segment is answered with a reset; the upstream learns only when its own retransmissions
      give up.
    - nft 1.0.6 (Debian 12) drops conntrack timeout policies given in JSON: they are made in
      nft's own syntax around the JSON transaction (see `transaction`).

What the wiring stage must do
    settings    `LABELPROXY_FORWARDING` = auto | relay | kernel: build a `KernelEngine` unless
                `relay`; `engine.probe()` failing is fatal for `kernel`, logged once (path
                "relay: nftables unavailable: <reason>") for `auto`.
    labels      `proxy.<alias>.forwarding: relay|auto` -> a `RouteOptions.forwarding` field
                (`eligible` already reads it: "relay" sends the route to the relay).
    reconciler  per route: `engine.assess(spec)`; kernel routes go to one `engine.apply(...)`
                per pass (with every kernel route, not a diff), relay routes to the streams
                as today. The listen socket stays labelproxy's: bind it exactly as today (so
                bind conflicts are reported as today) and keep the relay listening on it: the
                kernel translates the flows it carries before any socket sees them, and what
                it does not carry (`Verdict.uncovered`, e.g. IPv6 clients of a dual-stack
                route whose backends are IPv4; everything while the engine is down) reaches
                the relay instead of a closed port. Close the socket when the route goes.
                A task sleeps until `engine.next_deadline()` and calls `cut_expired()`.
                Start-up: `engine.start()` before the first pass (adopts: no flow is cut).
                Shutdown: `engine.apply([])`, wait until `draining_active()` is 0 or the
                drain deadline, then `engine.close()`.
    metrics     at scrape time from `engine.counters()` (one nft listing and one conntrack
                dump, about 0.2 s for 1,000 routes): connections_total, connections_active
                (TCP) / udp_sessions_active (UDP) from `active`,
                connections_rejected_total{reason=acl|limit|no_backend},
                udp_datagrams_total{direction} from packets_in/out of UDP routes, and new
                labelproxy_ip_bytes_total{route,listen,direction} and
                labelproxy_ip_packets_total{...}: IP bytes with headers, as the hooks see
                them (after GRO one packet can hold several segments). bytes_total, dial
                errors/latency and connection_duration_seconds stay relay-only.
                route_info{forwarding="kernel"|"relay"}.
    /routes     per route: forwarding ("kernel" | "relay"), forwarding_reason (the
                Verdict's reason), client_address_hidden, families/uncovered, mark.
"""
