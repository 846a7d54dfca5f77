"""`labelproxy check`: lint labels and compose files before (or while) they are served.

`check` runs the command: it reads running containers (through `sources.discovery.list_once`)
or a compose file (`compose`, which `composeread` reads as Compose would and `composeorder`
orders as Compose creates its services), and puts the views through the same
`sources.desired.build_desired` the proxy uses. Nothing here runs in the proxy process's serve
path.
"""
