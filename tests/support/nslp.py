"""A real labelproxy process inside a test's network namespace, read through an agent there.

`NsLabelproxy(topology, env)` starts `ip netns exec <topology.host> python -m labelproxy`
(optionally under `setpriv` with CAP_NET_ADMIN dropped) with its HTTP endpoints on the
namespace's loopback; the test process is not in that namespace, so /routes and /metrics are
fetched by an agent that is (`tests.support.nsagent`, op `http_get`). Everything else is
`LabelproxyProcess`: waits with deadlines, stop by PID (SIGTERM), `kill()` (SIGKILL).

`NO_NET_ADMIN` is the `setpriv` prefix that starts it without CAP_NET_ADMIN;
`READ_ONLY_SYSCTLS` starts it in a mount namespace of its own where /proc/sys is read-only,
as Docker gives it to a container (even with host networking).
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path

from tests.support.lp import LabelproxyProcess
from tests.support.netns import Agent, Topology

NO_NET_ADMIN = ("setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin")
READ_ONLY_SYSCTLS = (
    "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
    'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"', "sh",
)  # fmt: skip


class NsLabelproxy(LabelproxyProcess):
    """labelproxy in `topology.host`; see the module docstring."""

    def __init__(
        self,
        topology: Topology,
        env: dict[str, str],
        *,
        agent: Agent | None = None,
        log_path: Path | None = None,
        without: Sequence[str] = (),
    ) -> None:
        self.agent = agent or topology.agent(topology.host)
        env = {"LABELPROXY_FORWARDING": "auto", **env}
        super().__init__(env, log_path=log_path,
                         prefix=("ip", "netns", "exec", topology.host, *without))

    def get(self, path: str) -> tuple[int, bytes]:
        reply = self.agent.call("http_get", url=self.base + path)
        return int(reply["status"]), str(reply["body"]).encode()

    def kill(self) -> int:
        """SIGKILL: no shutdown at all (the kernel table stays behind)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        return int(self.proc.returncode)
