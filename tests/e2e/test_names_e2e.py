"""Routes chosen by name end to end: a real labelproxy process, the suite's private engine,
two host-network containers labelled with `hostnames` on one port, each in front of its
own TLS upstream on loopback. Both names are served through the one port; once one
container stops, its name is refused (and counted `no_route`) while the other goes on."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.support.dockerd import PrivateDockerd, run_container
from tests.support.lp import LabelproxyProcess, free_port, wait_for
from tests.support.names import TlsUpstream, client_context, make_cert, tls_ask

pytestmark = pytest.mark.docker


def test_two_containers_share_a_port_by_name_and_a_stopped_one_is_refused(
    tmp_path: Path, dockerd: PrivateDockerd, docker_client: docker.DockerClient,
    busybox_image: str,
) -> None:  # fmt: skip
    names = ("a.test", "b.test")
    certs = {name: make_cert(tmp_path, name) for name in names}
    ups = {name: TlsUpstream(name, *certs[name]) for name in names}
    port = free_port()
    containers: dict[str, Any] = {
        name: run_container(
            docker_client, busybox_image, command=["sleep", "600"],
            labels={"proxy.tls.port": f"{port}:{ups[name].port}", "proxy.tls.bind": "127.0.0.1",
                    "proxy.tls.scheme": "tcp4", "proxy.tls.hostnames": name},
        )
        for name in names
    }  # fmt: skip
    ctx = client_context(*(cert for cert, _ in certs.values()))
    lp = LabelproxyProcess({"LABELPROXY_DOCKER_HOST": dockerd.host})
    try:
        lp.wait_ready()
        for name in names:
            answer = wait_for(functools.partial(tls_ask, port, name, ctx), what=f"route {name}")
            assert answer == (name, f"{name}:hello")
        containers["a.test"].stop(timeout=1)

        def a_refused() -> bool:
            try:
                tls_ask(port, "a.test", ctx)
            except OSError:  # closed before the server hello (an SSLError is an OSError)
                return True
            return False

        wait_for(a_refused, what="a.test refused once its container stopped")
        assert tls_ask(port, "b.test", ctx) == ("b.test", "b.test:hello")
        listen = f"tcp://127.0.0.1:{port}"
        rejected = lp.metric("labelproxy_connections_rejected_total", route="", listen=listen,
                             reason="no_route")  # fmt: skip
        assert rejected is not None and rejected >= 1
    finally:
        lp.stop()
        for up in ups.values():
            up.close()
