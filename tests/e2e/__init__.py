"""The product from outside: a real labelproxy process (routes file, signals, reloads, logs) and
the private Docker engine (discovery, containers, Swarm, Compose, the image, deploy/ files,
`labelproxy check`).
"""
