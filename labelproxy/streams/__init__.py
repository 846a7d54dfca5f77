"""The data plane: TCP and UDP listeners that relay to a route's backends.

Streams never learn about Docker. The runtime hands each listener a `LiveRoute` (the current
`RouteSpec`, counters, policy) and swaps its spec in place when only backends or options
change, so the socket and its live connections stay.
"""
