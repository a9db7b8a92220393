"""The metrics endpoint: a real HTTP server on loopback, scraped and read back with prometheus_client's own
parsers (classic text and OpenMetrics). The daemon-level scrape lives with the live netns tests."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from passtd.control.api import EgressRuleView, EgressView, ForwardCountersView, StatusView
from passtd.control.metrics import FlowCounters, MetricsServer, RpcCounters
from passtd.dataplane.core.flowtable import PROTO_TCP, PROTO_UDP, Flow, FlowEvent
from tests.control.samples import SAMPLE


class Source:
    def __init__(self) -> None:
        self.calls = 0

    async def status(self) -> StatusView:
        self.calls += 1
        await asyncio.sleep(0)
        return SAMPLE

    def listening_sockets(self) -> Mapping[str, int]:
        return {"tcp_in": 2, "udp_in": 0}

    def bind_failures(self) -> Mapping[str, int]:
        return {"tcp_in": 1}

    def tap_backlog(self) -> int:
        return 3

    def egress(self) -> EgressView:
        rule = EgressRuleView(id=4, action="deny", destination="192.0.2.0/24", matches=7)
        return EgressView(rules=(rule,), default_action="allow", default_matches=2,
                          denied={"tcp": 5, "udp": 2, "icmp": 0}, flows_reset_total=1)  # fmt: skip

    def forward_counters(self) -> Mapping[tuple[str, str], ForwardCountersView]:
        return {("tcp_in", "7"): ForwardCountersView(connections=2, bytes_in=300, bytes_out=4000)}


def _flow(proto: int) -> Flow:
    return Flow(1, proto, (proto, bytes(16), 1, 2), 0.0, 0.0)


async def _get(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def _scrape(accept: str = "") -> tuple[dict[str, object], str, int, list[int]]:
    flows, rpcs = FlowCounters(), RpcCounters()
    flows(FlowEvent("opened", _flow(PROTO_TCP), "ESTABLISHED"))
    flows(FlowEvent("closed", _flow(PROTO_TCP), "CLOSED", "fin"))
    flows(FlowEvent("closed", _flow(PROTO_UDP), "CLOSED", "timeout"))
    rpcs.record("GetStatus", "OK")
    server = MetricsServer(Source(), flows, rpcs)
    host, port = await server.start("127.0.0.1", 0)
    assert host == "127.0.0.1" and port > 0
    try:
        extra = f"Accept: {accept}\r\n" if accept else ""
        code, headers, body = await _get(port, f"GET /metrics HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        others = [
            (await _get(port, b"GET / HTTP/1.1\r\n\r\n"))[0],
            (await _get(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0],
            (await _get(port, b"garbage\r\n\r\n"))[0],
        ]
    finally:
        await server.close()
    assert code == 200
    return {"body": body.decode()}, headers["content-type"], server.scrapes, others


def _samples(families: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in families:  # type: ignore[attr-defined]
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_classic_text_parses_and_carries_the_figures() -> None:
    got, ctype, scrapes, others = asyncio.run(_scrape())
    assert ctype.startswith("text/plain; version=")
    assert scrapes == 1 and others == [404, 405, 400]
    samples = _samples(parse_text(str(got["body"])))
    c = SAMPLE.counters
    assert samples[("passtd_frames_total", (("direction", "from_guest"),))] == c.frames_from_guest
    assert samples[("passtd_bytes_total", (("direction", "to_guest"),))] == c.bytes_to_guest
    for reason, n in c.dropped.items():
        assert samples[("passtd_dropped_total", (("reason", reason),))] == n
    for proto, states in SAMPLE.flow_states.items():
        for state, n in states.items():
            assert samples[("passtd_flows", (("protocol", proto), ("state", state)))] == n
    assert samples[("passtd_flows_opened_total", (("protocol", "tcp"),))] == 1
    assert samples[("passtd_flows_closed_total", (("protocol", "udp"), ("reason", "timeout")))] == 1
    assert samples[("passtd_control_calls_total", (("code", "OK"), ("method", "GetStatus")))] == 1
    assert samples[("passtd_forward_listening_sockets", (("direction", "tcp_in"),))] == 2
    assert samples[("passtd_forward_bind_failures_total", (("direction", "tcp_in"),))] == 1
    assert samples[("passtd_tap_backlog_bytes", ())] == 3
    assert samples[("passtd_egress_rules", ())] == 1
    assert samples[("passtd_egress_rule_matches_total", (("action", "deny"), ("rule", "4")))] == 7
    assert samples[("passtd_egress_default_matches_total", (("action", "allow"),))] == 2
    assert samples[("passtd_egress_denied_total", (("protocol", "tcp"),))] == 5
    assert samples[("passtd_egress_flows_reset_total", ())] == 1
    rule = (("direction", "tcp_in"), ("rule", "7"))
    assert samples[("passtd_forward_rule_connections_total", rule)] == 2
    assert samples[("passtd_forward_rule_bytes_in_total", rule)] == 300
    assert samples[("passtd_forward_rule_bytes_out_total", rule)] == 4000
    assert samples[("passtd_process_open_fds", ())] > 0
    assert samples[("passtd_process_resident_memory_bytes", ())] > 1 << 20


def test_openmetrics_when_asked() -> None:
    got, ctype, _, _ = asyncio.run(_scrape("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"))
    assert ctype.startswith("application/openmetrics-text")
    body = str(got["body"])
    assert body.endswith("# EOF\n")
    samples = _samples(parse_openmetrics(body))
    assert samples[("passtd_flows_closed_total", (("protocol", "tcp"), ("reason", "fin")))] == 1


def test_slow_or_oversized_requests_are_cut_off() -> None:
    async def run() -> bytes:
        server = MetricsServer(Source(), FlowCounters(), RpcCounters())
        _, port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return answer
        finally:
            await server.close()

    assert asyncio.run(run()) == b""  # closed without an answer: the head exceeded 8 KiB


@pytest.mark.parametrize("accept", ["", "text/plain"])
def test_plain_clients_get_the_classic_format(accept: str) -> None:
    _, ctype, _, _ = asyncio.run(_scrape(accept))
    assert "openmetrics" not in ctype
