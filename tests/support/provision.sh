#!/usr/bin/env bash
# Install what the test suite needs, for `tests/run` (which calls this first). Idempotent: on a
# provisioned machine it only checks, in well under a second.
#   1. Debian/Ubuntu packages (APT_PACKAGES): apt-get install what is missing, when root;
#      otherwise say what is missing and go on (the tests that need it skip, or fail under CI).
#      Never at the cost of a package already there (apt-get --no-remove): a host with Docker
#      CE keeps it (docker.io counts as present when dockerd is), busybox stays, and so on.
#   2. the virtualenv .venv of this checkout with labelproxy (editable) and its [test] extras,
#      reinstalled only when pyproject.toml changed; skipped when PYTHON names an interpreter
#      that already has them.
#   3. Docker Compose v2 (tests/support/install_compose.sh).
# Package scripts are kept from starting services (nginx on :80, prometheus, dockerd...) through
# a policy-rc.d, which is only created, and then removed, when there was none.
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf '== %s\n' "$*" >&2; }

APT_PACKAGES=(
    docker.io busybox-static            # the private dockerd the suite starts, busybox test image
    socat haproxy nginx libnginx-mod-stream iperf3 wrk dnsutils   # peers and clients
    debootstrap                         # the local Python base image for the image test
    docker-compose                      # Compose v1: labelproxy check --compose falls back to it
    prometheus                          # promtool, to check the alert rules
    redis-server dnsmasq-base openssh-server postgresql mosquitto   # real servers for the health probes
    python3 python3-venv python3-pip gcc libc6-dev git ca-certificates procps iproute2
    util-linux                          # nsenter/unshare: a private dockerd in a test's netns
    nftables                            # nft: the kernel fast path (tests run it in their own netns)
)

# -- 1. packages -------------------------------------------------------------------------------
missing=()
if command -v dpkg-query >/dev/null; then
    installed="$(dpkg-query -W -f='${Package} ${Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null || true)"
    for pkg in "${APT_PACKAGES[@]}"; do
        [ "$pkg" = docker.io ] && command -v dockerd >/dev/null && continue
        grep -qx "$pkg install ok installed" <<<"$installed" || missing+=("$pkg")
    done
fi
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        log "WARNING: not root, cannot install: ${missing[*]} (tests needing them will skip)"
    else
        log "apt-get install ${missing[*]}"
        policy=/usr/sbin/policy-rc.d
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' > "$policy"
            chmod +x "$policy"
            trap 'rm -f "$policy"' EXIT
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt_get() { apt-get -o DPkg::Lock::Timeout=300 -y -qq "$@" </dev/null; }
        apt_get update >/dev/null
        if ! apt_get install --no-install-recommends --no-remove "${missing[@]}" >/dev/null; then
            for pkg in "${missing[@]}"; do     # one by one: all that install without removals
                apt_get install --no-install-recommends --no-remove "$pkg" >/dev/null \
                    || log "WARNING: $pkg not installed (it would remove a package, or is unknown)"
            done
        fi
    fi
fi

# -- 2. Python environment ---------------------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then
    "$PYTHON" -c 'import labelproxy, pytest, mypy, ruff, importlinter' 2>/dev/null || {
        log "PYTHON=$PYTHON lacks labelproxy or its test tools: pip install -e '.[test]' into it"
        exit 1
    }
else
    stamp=.venv/.provisioned-test
    want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(python3 -V 2>&1)"
    if [ ! -x .venv/bin/python ]; then
        log "python3 -m venv .venv"
        python3 -m venv .venv
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        if ! .venv/bin/python -c 'import pip' 2>/dev/null; then
            python3 -m venv --clear .venv    # a venv left half-made (no pip) by a failed run
        fi
        log "pip install -e '.[test]' into .venv"
        .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
        echo "$want" > "$stamp"
        echo "$want" > .venv/.provisioned-run   # the run script (deploy/run) needs no more
    fi
fi

# -- 3. Compose v2 -----------------------------------------------------------------------------
if command -v docker >/dev/null; then
    bash tests/support/install_compose.sh >/dev/null
fi
