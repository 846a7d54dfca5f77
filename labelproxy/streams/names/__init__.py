"""Routes chosen by name on one shared TCP listener (`hostnames`): reading the name.

`reader.NameReader` reads the name a client asks for from its first bytes, whichever it
sends: a TLS ClientHello's server name (`hello`) or a Minecraft Java handshake's server
address (`minecraft`); `table.NameTable` picks the route for it (exact, then the longest
wildcard, then `*`). Everything here is pure (no socket, no clock): the shared listener
that feeds them on the data loop is `tcp.names.NameGroup`.
"""
