# labelproxy container image.
#
#   docker build -t labelproxy:local .
#   docker run -d --name labelproxy --network host \
#     -v /var/run/docker.sock:/var/run/docker.sock:ro \
#     --group-add "$(stat -c %g /var/run/docker.sock)" labelproxy:local
#
# Build arguments:
#   BASE_IMAGE  any Debian-like image with python3 (>= 3.11) and its venv module; default the
#               official python:3.11-slim. A locally made base (debootstrap --variant=minbase
#               --include=python3-venv bookworm, then docker import) works too: it has Python at
#               /usr/bin/python3 and no pip, so everything is installed into a venv.
#   VERSION     the version put in the OCI labels.
# Offline builds: put prebuilt wheels in ./wheels (pip wheel -w wheels .) and the builder
# installs from them with --no-index instead of asking PyPI.
#
# Docker socket access: the process runs as the unprivileged user labelproxy (uid/gid 10001).
# The socket is owned by root and the host's "docker" group, whose numeric id differs between
# hosts, so add that group id at run time rather than baking one in:
#   docker run --group-add "$(stat -c %g /var/run/docker.sock)" ...
#   compose: group_add: ["${DOCKER_GID}"]  with DOCKER_GID=$(stat -c %g /var/run/docker.sock)
# Or give it no socket at all and point LABELPROXY_DOCKER_HOST at a docker-socket-proxy
# (deploy/compose.socket-proxy.yaml).
#
# Kernel fast path (LABELPROXY_FORWARDING=auto, the default): routes the kernel can carry are
# forwarded by nftables (the image has `nft`), which needs CAP_NET_ADMIN in the host's network
# namespace: host networking and --cap-add NET_ADMIN. Docker hands an added capability only to
# root in the container (a non-root user gets none of it), so run it as uid 0 with every other
# capability dropped:
#   docker run -d --network host --user 0:0 --cap-drop ALL --cap-add NET_ADMIN \
#     -v /var/run/docker.sock:/var/run/docker.sock:ro labelproxy:local
# Without it every route is relayed, and the log says so once ("forwarding: every route on the
# relay: nftables unavailable: ... Operation not permitted"). /proc/sys is read-only in a
# container: routes with a loopback backend that remote clients reach (host-network
# containers) need net.ipv4.conf.all.route_localnet=1, set on the host, to be forwarded by the
# kernel; without it they stay on the relay, and /routes says why.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/labelproxy
WORKDIR /src
COPY . /src
RUN set -eu; \
    if ls wheels/*.whl >/dev/null 2>&1; then \
        echo "installing from the prebuilt wheels in ./wheels (offline)"; \
        mkdir -p /wheels && cp wheels/*.whl /wheels/; \
    else \
        /opt/labelproxy/bin/pip wheel --wheel-dir /wheels /src; \
    fi; \
    /opt/labelproxy/bin/pip install --no-index --find-links /wheels labelproxy; \
    /opt/labelproxy/bin/pip uninstall --yes pip setuptools wheel >/dev/null 2>&1 || true; \
    find /opt/labelproxy -name '__pycache__' -prune -exec rm -rf {} +; \
    /opt/labelproxy/bin/labelproxy --version

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/labelproxy/labelproxy
LABEL org.opencontainers.image.title="labelproxy" \
      org.opencontainers.image.description="Docker-label-driven TCP/UDP proxy with per-route Prometheus metrics" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"
# nftables (`nft`) for the kernel fast path; a base that has it (the tests' offline base) skips apt
RUN if ! command -v nft >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends nftables \
        && rm -rf /var/lib/apt/lists/*; \
    fi; \
    nft --version
RUN groupadd --system --gid 10001 labelproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin labelproxy
COPY --from=builder /opt/labelproxy /opt/labelproxy
ENV PATH=/opt/labelproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LABELPROXY_HTTP_ADDR=0.0.0.0:9464
USER 10001:10001
EXPOSE 9464
STOPSIGNAL SIGTERM
# /healthz on the port of LABELPROXY_HTTP_ADDR, asked on loopback (no curl in the image).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os,urllib.request as u;a=os.environ.get('LABELPROXY_HTTP_ADDR','0.0.0.0:9464');h,_,p=a.rpartition(':');h=h.strip('[]');h={'':'127.0.0.1','0.0.0.0':'127.0.0.1','::':'[::1]'}.get(h,f'[{h}]' if ':' in h else h);u.urlopen(f'http://{h}:{p}/healthz',timeout=2)"]
ENTRYPOINT ["labelproxy"]
