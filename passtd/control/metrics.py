"""Prometheus and OpenMetrics exposition of what the daemon is doing (`--metrics-listen ADDR:PORT`).

A scrape reads the flow table and the counters, which belong to the event loop, so it is answered on that
loop by a small HTTP/1.1 responder (asyncio streams), not by prometheus_client's threaded server: no thread
ever touches the data path (STYLE 1.9). prometheus_client only builds the text, in the classic format or in
OpenMetrics when the scraper's Accept header asks for it. One scrape is one `await source.status()`, which
yields to the data path on large tables like every other control call.

Requests are bounded (8 KiB of head, 5 s to send it, a few concurrent scrapes): the endpoint is meant for a
Prometheus on the same host or a trusted network, but a stray client must not cost the data path anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from passtd.control.api import EgressView, ForwardCountersView, StatusView
from passtd.dataplane.core.flowtable import PROTO_ICMP, PROTO_TCP, PROTO_UDP, FlowEvent

PROTO_NAMES: Final = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp"}
HEAD_MAX: Final = 8192  # request line and headers
HEAD_TIMEOUT: Final = 5.0
MAX_SCRAPES: Final = 4  # concurrent requests; more are answered 503 at once


class FlowCounters:
    """Flows opened and closed (by reason) since start: a flow-table watcher, so counts survive expiry.

    Registered with the dataplane only when metrics are served: every watcher makes the data path build an
    event object per flow transition.
    """

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter()
        self.closed: Counter[tuple[str, str]] = Counter()

    def __call__(self, event: FlowEvent) -> None:
        if event.kind == "opened":
            self.opened[PROTO_NAMES.get(event.flow.proto, "other")] += 1
        elif event.kind == "closed":
            self.closed[(PROTO_NAMES.get(event.flow.proto, "other"), event.reason or "unknown")] += 1


@dataclass
class RpcCounters:
    """Control calls by method and status code, filled by the control server."""

    calls: Counter[tuple[str, str]] = field(default_factory=Counter)

    def record(self, method: str, code: str) -> None:
        self.calls[(method, code)] += 1


class MetricsSource(Protocol):
    """What a scrape reads; `DaemonControl` provides it."""

    async def status(self) -> StatusView:
        """A fresh snapshot of the daemon (yields on large flow tables)."""
        ...

    def listening_sockets(self) -> Mapping[str, int]:
        """Forwarding direction (tcp_in, udp_in, tcp_out, udp_out) → listening sockets bound now."""
        ...

    def bind_failures(self) -> Mapping[str, int]:
        """Forwarding direction → binds that failed since start."""
        ...

    def tap_backlog(self) -> int:
        """Bytes or frames queued toward the guest and not yet written (0 without a guest)."""
        ...

    def egress(self) -> EgressView:
        """The egress rules and their counters."""

    def forward_counters(self) -> Mapping[tuple[str, str], ForwardCountersView]:
        """(direction, rule id) → what came in through that forwarding rule (fwdtx)."""
        ...


@dataclass(frozen=True)
class Snapshot:
    """Everything one scrape reports, taken at one point of the loop."""

    status: StatusView
    listening: Mapping[str, int]
    bind_failures: Mapping[str, int]
    tap_backlog: int
    flows_opened: Mapping[str, int]
    flows_closed: Mapping[tuple[str, str], int]
    rpc_calls: Mapping[tuple[str, str], int]
    egress: EgressView = field(default_factory=EgressView)
    forward_rules: Mapping[tuple[str, str], ForwardCountersView] = field(default_factory=dict)


async def take_snapshot(source: MetricsSource, flows: FlowCounters, rpcs: RpcCounters) -> Snapshot:
    status = await source.status()
    return Snapshot(
        status=status,
        listening=dict(source.listening_sockets()),
        bind_failures=dict(source.bind_failures()),
        tap_backlog=source.tap_backlog(),
        flows_opened=dict(flows.opened),
        flows_closed=dict(flows.closed),
        rpc_calls=dict(rpcs.calls),
        egress=source.egress(),
        forward_rules=dict(source.forward_counters()),
    )


Rows = Iterable[tuple[Iterable[str], float]]


def _family(counter: bool, name: str, doc: str, labels: Iterable[str], rows: Rows) -> Metric:
    """One metric family; counters get their `_total` suffix from prometheus_client."""
    family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=list(labels))
    for values, value in rows:
        family.add_metric(list(values), value)
    return family


def _each(mapping: Mapping[str, int]) -> Rows:
    return (((key,), n) for key, n in sorted(mapping.items()))


def _each2(mapping: Mapping[tuple[str, str], int]) -> Rows:
    return ((key, n) for key, n in sorted(mapping.items()))


class _SnapshotCollector(Collector):
    """Turns one Snapshot into metric families; names follow Prometheus conventions (passtd_ prefix, _total
    for counters, base units)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        s = self.snap
        st = s.status
        c = st.counters
        flow_states = (
            ((proto, state), n)
            for proto, states in sorted(st.flow_states.items())
            for state, n in sorted(states.items())
        )
        frames = [(("from_guest",), c.frames_from_guest), (("to_guest",), c.frames_to_guest)]
        octets = [(("from_guest",), c.bytes_from_guest), (("to_guest",), c.bytes_to_guest)]
        gauge, counter = False, True
        families: list[tuple[bool, str, str, tuple[str, ...], Rows]] = [
            (gauge, "passtd_info", "Version and mode (value 1).", ("version", "mode"),
             [((st.version, st.mode), 1)]),
            (gauge, "passtd_uptime_seconds", "Seconds since the daemon started.", (), [((), st.uptime)]),
            (gauge, "passtd_guest_connected", "1 while a guest is attached.", (),
             [((), int(st.backend.guest_connected))]),
            (gauge, "passtd_flows", "Open flows by protocol and state.", ("protocol", "state"), flow_states),
            (gauge, "passtd_flows_max", "The flow table's size limit.", (), [((), st.limits.max_flows)]),
            (counter, "passtd_flows_opened", "Flows opened, by protocol.", ("protocol",),
             _each(s.flows_opened)),
            (counter, "passtd_flows_closed", "Flows closed, by protocol and reason.", ("protocol", "reason"),
             _each2(s.flows_closed)),
            (counter, "passtd_frames", "Ethernet frames exchanged with the guest.", ("direction",), frames),
            (counter, "passtd_bytes", "Bytes of frames exchanged with the guest.", ("direction",), octets),
            (counter, "passtd_dropped", "Frames and datagrams dropped, by reason.", ("reason",),
             _each(c.dropped)),
            (gauge, "passtd_forward_listening_sockets", "Listening sockets of the port forwarding.",
             ("direction",), _each(s.listening)),
            (counter, "passtd_forward_bind_failures", "Forwarded-port binds that failed.", ("direction",),
             _each(s.bind_failures)),
            (counter, "passtd_control_calls", "Control (gRPC) calls by method and status code.",
             ("method", "code"), _each2(s.rpc_calls)),
            (gauge, "passtd_tap_backlog_bytes", "Bytes queued toward the guest, not yet written.", (),
             [((), s.tap_backlog)]),
            (gauge, "passtd_flows_limit", "Flow cap per protocol.", ("protocol",),
             [((p,), lim.max) for p, lim in sorted(st.limits.flows_by_protocol.items())]),
            (gauge, "passtd_descriptors_limit", "The soft RLIMIT_NOFILE (0: unlimited).", (),
             [((), st.limits.descriptors.soft_limit)]),
            (gauge, "passtd_descriptors_reserved", "Descriptors kept free for control and the tap.", (),
             [((), st.limits.descriptors.reserved)]),
            (gauge, "passtd_descriptors_in_use", "Descriptors open now.", (),
             [((), st.limits.descriptors.in_use)]),
        ]  # fmt: skip
        families += _egress_families(s.egress)
        families += _forward_rule_families(s.forward_rules)
        families.extend(rate_limit_families(st))
        for kind, name, doc, labels, rows in families:
            yield _family(kind, name, doc, labels, rows)


def _egress_families(e: EgressView) -> list[tuple[bool, str, str, tuple[str, ...], Rows]]:
    """Egress rules: new flows each rule decided (by id and action), the default's, denials by protocol."""
    return [
        (False, "passtd_egress_rules", "Egress rules in the list.", (), [((), len(e.rules))]),
        (True, "passtd_egress_rule_matches", "New guest flows each egress rule decided.",
         ("rule", "action"),
         [((str(r.id), r.action), r.matches) for r in e.rules]),
        (True, "passtd_egress_default_matches", "New guest flows no egress rule matched (default action).",
         ("action",), [((e.default_action,), e.default_matches)]),
        (True, "passtd_egress_denied", "New guest flows the egress rules refused.",
         ("protocol",),
         _each(e.denied)),
        (True, "passtd_egress_flows_reset", "Open flows closed because a new egress list denied them.", (),
         [((), e.flows_reset_total)]),
    ]  # fmt: skip


def _forward_rule_families(
    rules: Mapping[tuple[str, str], ForwardCountersView],
) -> list[tuple[bool, str, str, tuple[str, ...], Rows]]:
    """fwdtx: one series per forwarding rule (labels direction and rule id) for each of its counters."""
    labels = ("direction", "rule")
    ordered = sorted(rules.items(), key=lambda kv: (kv[0][0], int(kv[0][1])))

    def rows(attr: str) -> Rows:
        return [(key, getattr(view, attr)) for key, view in ordered]

    return [
        (True, "passtd_forward_rule_connections", "TCP connections accepted through a forwarding rule.",
         labels, rows("connections")),
        (True, "passtd_forward_rule_datagrams", "UDP datagrams received on a forwarding rule's ports.",
         labels, rows("datagrams")),
        (True, "passtd_forward_rule_bytes_in", "Bytes from the clients of a forwarding rule's ports.",
         labels, rows("bytes_in")),
        (True, "passtd_forward_rule_bytes_out", "Bytes back to the clients of a forwarding rule's ports.",
         labels, rows("bytes_out")),
    ]  # fmt: skip


def rate_limit_families(st: StatusView) -> list[tuple[bool, str, str, tuple[str, ...], Rows]]:
    """The guest's rate limits (bit/s, 0: unlimited) and what they did: bytes carried under a limit, TCP
    waits for tokens (count and seconds), datagrams dropped over a limit."""
    rl = st.rate_limits
    if rl is None:
        return []
    c = rl.counters
    dirs = ("egress", "ingress")
    return [
        (False, "passtd_rate_limit_bits_per_second", "Configured rate limit (0: unlimited).", ("direction",),
         [(("egress",), rl.egress.rate), (("ingress",), rl.ingress.rate)]),
        (False, "passtd_rate_limit_burst_bytes", "Configured bucket size.", ("direction",),
         [(("egress",), rl.egress.burst), (("ingress",), rl.ingress.burst)]),
        (True, "passtd_rate_limited_bytes", "Payload bytes carried under a rate limit.", ("direction",),
         [((d,), c.get(f"{d}.bytes", 0)) for d in dirs]),
        (True, "passtd_rate_limit_tcp_waits", "Times a TCP flow waited for tokens.", ("direction",),
         [((d,), c.get(f"tcp.{d}.held", 0)) for d in dirs]),
        (True, "passtd_rate_limit_tcp_wait_seconds", "Planned TCP waits for tokens.", ("direction",),
         [((d,), c.get(f"tcp.{d}.held_us", 0) / 1e6) for d in dirs]),
        (True, "passtd_rate_limit_dropped", "Datagrams dropped over a rate limit.", ("protocol", "direction"),
         [((p, d), c.get(f"{p}.{d}.dropped", 0)) for p in ("udp", "icmp") for d in dirs]),
    ]  # fmt: skip


def render(snap: Snapshot, *, openmetrics: bool) -> tuple[bytes, str]:
    """The exposition body and its content type. The process collector adds RSS, open descriptors and CPU
    (process_resident_memory_bytes, process_open_fds, ...), read from /proc at this moment."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))
    ProcessCollector(namespace="passtd", registry=registry)
    if openmetrics:
        return generate_openmetrics(registry), OPENMETRICS_CONTENT_TYPE  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def wants_openmetrics(accept: str) -> bool:
    """Prometheus asks for OpenMetrics first in its Accept header; curl and the like get the classic text."""
    return "application/openmetrics-text" in accept


class MetricsServer:
    """GET /metrics over HTTP/1.1 on the daemon's loop; anything else is 404 (or 405 for other methods)."""

    def __init__(self, source: MetricsSource, flows: FlowCounters, rpcs: RpcCounters) -> None:
        self.source = source
        self.flows = flows
        self.rpcs = rpcs
        self.scrapes = 0
        self._busy = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and listen; returns the address actually bound (port 0 picks a free one)."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=HEAD_MAX)
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._busy >= MAX_SCRAPES:
                await self._reply(writer, 503, b"too many scrapes at once\n", "text/plain")
                return
            self._busy += 1
            try:
                await self._one(reader, writer)
            finally:
                self._busy -= 1
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(HEAD_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._reply(writer, 400, b"bad request\n", "text/plain")
            return
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if target.split("?", 1)[0] != "/metrics":
            await self._reply(writer, 404, b"only /metrics here\n", "text/plain")
            return
        if method not in ("GET", "HEAD"):
            await self._reply(writer, 405, b"GET only\n", "text/plain")
            return
        snap = await take_snapshot(self.source, self.flows, self.rpcs)
        body, ctype = render(snap, openmetrics=wants_openmetrics(headers.get("accept", "")))
        self.scrapes += 1
        await self._reply(writer, 200, body if method == "GET" else b"", ctype, length=len(body))

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter, code: int, body: bytes, ctype: str, length: int | None = None
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}[code]  # fmt: skip
        head = (
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
