"""What the benchmark measures (sections and metrics) and how results are reported.

`Results` collects every sample (metric -> target -> values over repetitions), the raw tool
output per run and every error. `render_markdown` prints one table per metric, grouped by
section: target | median | min-max | vs direct | vs best peer, under a header naming the
machine, the versions and the command; `to_json` keeps the raw samples.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

PEERS = ("haproxy", "nginx", "socat")
KERNEL = "labelproxy-kernel"  # labelproxy with nftables forwarding (bench --netns)
CHECKED = "labelproxy-checked"  # the relay with 1,000 idle routes with default checks beside
ROUTES = "labelproxy-routes"  # the relay with 1,000 idle routes, checks off, beside


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_is_better: bool


@dataclass(frozen=True, slots=True)
class Section:
    key: str
    title: str
    metrics: tuple[Metric, ...]
    note: str = ""


def _m(key: str, title: str, unit: str, *, higher: bool) -> Metric:
    return Metric(key=key, title=title, unit=unit, higher_is_better=higher)


SECTIONS: tuple[Section, ...] = (
    Section(
        "tcp_bulk",
        "TCP bulk throughput (iperf3)",
        (
            _m("tcp_bulk_1_gbps", "1 stream", "Gbit/s", higher=True),
            _m("tcp_bulk_1_cpu_s_per_gb", "1 stream, proxy CPU", "CPU s/GB", higher=False),
            _m("tcp_bulk_8_gbps", "8 streams", "Gbit/s", higher=True),
            _m("tcp_bulk_8_cpu_s_per_gb", "8 streams, proxy CPU", "CPU s/GB", higher=False),
        ),
        "CPU = utime+stime of the proxy's processes (/proc/PID/stat) over the transfer / GB.",
    ),
    Section(
        "short_conns",
        "Short connections",
        (
            _m(
                "short_conns_per_s", "connect, 64 B, echo, close; 50 clients", "conn/s", higher=True
            ),
            _m("short_conns_user_us", "proxy user CPU per connection", "us", higher=False),
            _m("short_conns_sys_us", "proxy kernel CPU per connection", "us", higher=False),
        ),
        "C epoll client and C epoll echo upstream. User and kernel CPU: utime and stime of the "
        "proxy's processes over the run / connections completed: the interpreter's share "
        "against the system calls' share.",
    ),
    Section(
        "http",
        "HTTP through the proxy (wrk -t1 -c50, nginx upstream)",
        (
            _m("http_keepalive_rps", "keep-alive", "req/s", higher=True),
            _m("http_keepalive_p50_ms", "keep-alive p50", "ms", higher=False),
            _m("http_keepalive_p99_ms", "keep-alive p99", "ms", higher=False),
            _m("http_close_rps", "Connection: close", "req/s", higher=True),
            _m("http_close_p50_ms", "Connection: close p50", "ms", higher=False),
            _m("http_close_p99_ms", "Connection: close p99", "ms", higher=False),
        ),
    ),
    Section(
        "pingpong",
        "64 B ping-pong over one TCP connection",
        (
            _m("pingpong_p50_us", "round trip p50", "us", higher=False),
            _m("pingpong_p99_us", "round trip p99", "us", higher=False),
            _m("pingpong_msg_user_us", "proxy user CPU per message relayed", "us", higher=False),
            _m("pingpong_msg_sys_us", "proxy kernel CPU per message relayed", "us", higher=False),
        ),
        "Each round trip is two messages through the proxy (request and reply).",
    ),
    Section(
        "sni",
        "Routed by name (TLS SNI) on one shared port",
        (
            _m("sni_conns_per_s", "connect, ClientHello + 64 B, echo, close; 50 clients",
               "conn/s", higher=True),
            _m("sni_conns_user_us", "proxy user CPU per routed connection", "us", higher=False),
            _m("sni_conns_sys_us", "proxy kernel CPU per routed connection", "us", higher=False),
            _m("sni_pingpong_p50_us", "64 B round trip p50 after the ClientHello", "us",
               higher=False),
            _m("sni_pingpong_p99_us", "64 B round trip p99 after the ClientHello", "us",
               higher=False),
        ),
        "HAProxy `req_ssl_sni` after `inspect-delay` against labelproxy `hostnames`: two names "
        "on one port, a real ClientHello (about 500 B) first on every connection, echoed by "
        "the C upstream (no handshake completes). nginx, socat, pyfloor: not set up.",
    ),
    Section(
        "udp",
        "UDP",
        (
            _m("udp_delivered_per_s", "512 B datagrams delivered", "datagrams/s", higher=True),
            _m("udp_loss_pct", "512 B datagrams lost", "%", higher=False),
            _m("udp_rtt_p50_us", "64 B echo round trip p50", "us", higher=False),
            _m("udp_rtt_p99_us", "64 B echo round trip p99", "us", higher=False),
        ),
        "Flood: a C sender at its max rate for a fixed count (sendmmsg) into a counting sink; "
        "delivered/s = received / (last arrival - first send).",
    ),
    Section(
        "memory",
        "Idle TCP connections",
        (_m("memory_bytes_per_conn", "proxy PSS per idle connection", "bytes", higher=False),),
        "PSS (/proc/PID/smaps_rollup, all the proxy's processes) before and after opening the "
        "connections; each connection carried one 1 B echo, then sat idle. Each repetition "
        "runs on a freshly started proxy.",
    ),
    Section(
        "convergence",
        "Convergence (labelproxy, private dockerd)",
        (
            _m("start_accept_p50_ms", "start returned -> accepting, p50", "ms", higher=False),
            _m("start_accept_p99_ms", "start returned -> accepting, p99", "ms", higher=False),
            _m("start_call_accept_p99_ms", "start issued -> accepting, p99", "ms", higher=False),
            _m("wake_echo_p50_ms", "wake: first byte to a sleeping route -> echo, p50", "ms",
               higher=False),
            _m("wake_start_listening_p50_ms",
               "the same container: docker start issued -> listening, p50", "ms", higher=False),
            _m("sync_ready_s", "initial sync: spawn -> /readyz 200", "s", higher=False),
            _m(
                "sync_accepting_s",
                "initial sync: spawn -> every listener accepting",
                "s",
                higher=False,
            ),
        ),
    ),
)
SECTION_KEYS = tuple(section.key for section in SECTIONS)


@dataclass
class Results:
    """Every sample, raw record, not-applicable cell and error of one run."""

    targets: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    not_applicable: dict[str, dict[str, str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(
        self, *, section: str, target: str, rep: int, values: dict[str, float], raw: dict[str, Any]
    ) -> None:
        for key, value in values.items():
            self.samples.setdefault(key, {}).setdefault(target, []).append(value)
        self.records.append(
            {"section": section, "target": target, "rep": rep, "values": values, "raw": raw}
        )

    def skip(self, *, section: Section, target: str, reason: str) -> None:
        for metric in section.metrics:
            self.not_applicable.setdefault(metric.key, {})[target] = reason

    def error(self, *, section: str, target: str, rep: int, message: str) -> None:
        self.errors.append(f"{section} / {target} / rep {rep + 1}: {message}")
        self.records.append({"section": section, "target": target, "rep": rep, "error": message})


def fmt(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(value: float, reference: float | None) -> str:
    if reference is None or reference == 0:
        return "n/a"
    return f"{value / reference:.2f}x"


def render_metric(metric: Metric, results: Results) -> list[str]:
    by_target = results.samples.get(metric.key, {})
    medians = {t: statistics.median(v) for t, v in by_target.items() if v}
    peer_medians = [medians[p] for p in PEERS if p in medians]
    best_peer = (max if metric.higher_is_better else min)(peer_medians) if peer_medians else None
    direction = "higher is better" if metric.higher_is_better else "lower is better"
    lines = [
        f"#### {metric.title} ({metric.unit}, {direction})",
        "",
        "| target | median | min-max | vs direct | vs best peer |",
        "|---|---:|---:|---:|---:|",
    ]
    skipped = results.not_applicable.get(metric.key, {})
    for target in results.targets:
        values = by_target.get(target)
        if values:
            span = f"{fmt(min(values))}-{fmt(max(values))}"
            median = medians[target]
            vs_direct = _ratio(median, medians.get("direct"))
            lines.append(
                f"| {target} | {fmt(median)} | {span} | {vs_direct} | {_ratio(median, best_peer)} |"
            )
        else:
            reason = skipped.get(target, "error (see Errors)")
            lines.append(f"| {target} | {reason} | | | |")
    return [*lines, ""]


def render_summary(results: Results, sections: list[str]) -> list[str]:
    """One row per measurement: each target's median, then labelproxy's ratio to HAProxy
    and to the best peer (the table the README's Performance section shows). With the
    `labelproxy-kernel` target, the ratios of both labelproxy paths to direct and to the
    best peer instead."""
    names = {"direct": "direct", "haproxy": "HAProxy", "nginx": "nginx", "socat": "socat"}
    targets = results.targets
    ours_all = [t for t in ("labelproxy", KERNEL, ROUTES, CHECKED) if t in targets]
    with_kernel = KERNEL in targets
    ratio_titles = (
        ["relay vs direct", "kernel vs direct", "relay vs best peer", "kernel vs best peer"]
        if with_kernel else ["vs HAProxy", "vs best peer"]
    )  # fmt: skip
    if ROUTES in targets:  # what 1,000 idle routes cost the relay, in this run
        ratio_titles.append("with 1,000 unchecked routes vs without")
    if CHECKED in targets:  # what 1,000 checked idle routes cost the relay, in this run
        ratio_titles.append("with 1,000 checked routes vs without")
    out = [
        "| measurement | "
        + " | ".join(names.get(t, t) for t in targets)
        + " | " + " | ".join(ratio_titles) + " |",
        "|---|" + "---:|" * (len(targets) + len(ratio_titles)),
    ]
    for section in SECTIONS:
        if section.key not in sections or section.key == "convergence":
            continue
        for metric in section.metrics:
            by_target = results.samples.get(metric.key, {})
            medians = {t: statistics.median(v) for t, v in by_target.items() if v}
            if not any(t in medians for t in ours_all):
                continue
            pick = max if metric.higher_is_better else min
            peers = [medians[p] for p in PEERS if p in medians]
            best = pick(peers) if peers else None
            cells = [
                (f"**{fmt(medians[t])}**" if t in ours_all else fmt(medians[t]))
                if t in medians
                else "n/a"
                for t in targets
            ]
            direction = "higher is better" if metric.higher_is_better else "lower is better"
            title = f"{section.title.split(' (')[0]}: {metric.title} ({metric.unit}, {direction})"
            def ratio(target: str, reference: float | None,
                      medians: dict[str, float] = medians) -> str:
                return _ratio(medians[target], reference) if target in medians else "n/a"

            if with_kernel:
                direct = medians.get("direct")
                ratios = [ratio("labelproxy", direct), ratio(KERNEL, direct),
                          ratio("labelproxy", best), ratio(KERNEL, best)]
            else:
                ratios = [ratio("labelproxy", medians.get("haproxy")), ratio("labelproxy", best)]
            if ROUTES in targets:
                ratios.append(ratio(ROUTES, medians.get("labelproxy")))
            if CHECKED in targets:
                ratios.append(ratio(CHECKED, medians.get("labelproxy")))
            out.append(f"| {title} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return [*out, ""]


def render_markdown(
    *, header: dict[str, str], notes: dict[str, str], results: Results, sections: list[str]
) -> str:
    out = [
        "# labelproxy side-by-side benchmark",
        "",
        f"- machine: {header['cpu']}, {header['cores']} cores, Linux {header['kernel']}",
        f"- versions: {header['versions']}; labelproxy {header['labelproxy']}",
        f"- date: {header['date']}",
        f"- command: `{header['command']}`",
        f"- plan: {header['plan']}",
        "- everything on 127.0.0.1; targets interleaved round robin within each repetition; "
        "median and min-max over the repetitions; ratios = target median / reference median "
        "(for lower-is-better metrics a ratio below 1.00x is better); best peer = the best of "
        "haproxy, nginx and socat for that metric.",
        "- targets:",
    ]
    out += [f"  - {name}: {note}" for name, note in notes.items()]
    out += ["", "### Summary (medians; labelproxy's ratios)", ""]
    out += render_summary(results, sections)
    for section in SECTIONS:
        if section.key not in sections:
            continue
        out += [f"### {section.title}", ""]
        if section.note:
            out += [section.note, ""]
        for metric in section.metrics:
            out += render_metric(metric, results)
    if results.errors:
        out += ["### Errors", ""] + [f"- {message}" for message in results.errors] + [""]
    return "\n".join(out)


def to_json(*, header: dict[str, str], notes: dict[str, str], results: Results) -> dict[str, Any]:
    return {
        "header": header,
        "targets": notes,
        "samples": results.samples,
        "records": results.records,
        "not_applicable": results.not_applicable,
        "errors": results.errors,
    }
