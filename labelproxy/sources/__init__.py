"""Where routes come from: the Docker engine and the routes file, turned into one desired state.

`discovery` (the only module that talks to the engine, through docker-py) lists containers and
publishes them as plain `ContainerView`s (`containers`, built by `dockerviews`), with `liveness`
pinging the engine and `blocking` running docker-py's calls on daemon threads. `labels`,
`fields` and `resolve` turn a view's labels into `RouteSpec`s (pure); `routesfile` does the same
for the routes file, which `staticroutes` watches and reloads. `desired.build_desired` merges
both into one `DesiredState` (listen key -> `RouteSpec`, plus problems): the only thing this
package hands on, to the reconciler. Nothing here touches a listener.
"""
