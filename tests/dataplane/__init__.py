"""Real loopback sockets in the test process: the TCP and UDP relays (streams/tcp, streams/udp)
and the policy at their edge (PROXY protocol, ACLs, caps, dial accounting, deadlines), the
reconciler driving real listeners, the HTTP endpoints, the health checker and probes against
real servers, and the runtime built in-process.
"""
