"""UDP flow decisions: where a guest datagram goes, how host peers appear, how replies are built."""

from __future__ import annotations

import struct
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import dpkt

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.flowtable import FlowTable
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.udp import (
    FLUSH_FIRST,
    GATHERED,
    GSO_MAX_BYTES,
    RUN_COMPLETE,
    SEND_ALONE,
    UdpCore,
    UdpFlow,
    guest_template,
    new_guest_flow,
    port_unreachable,
    remote_as_seen,
    target_for,
)
from passtd.dataplane.packets.udp import udp_headers
from tests.helpers.tcpfake import CTX, FAR4, GUEST4, GW4

LOOP4 = bytes((127, 0, 0, 1))
DNS_FWD = (IPv4Address("10.77.0.99"), IPv6Address("fd77::99"))
UPSTREAM = (IPv4Address("127.0.0.53"), IPv6Address("::1"))


def test_targets() -> None:
    assert target_for(CTX, GW4, 9999) == LOOP4
    assert target_for(CTX, FAR4, 9999) == FAR4
    assert target_for(Context(ip4=CTX.ip4, map_gw=False), GW4, 1) == GW4
    fwd4 = DNS_FWD[0].packed
    relay = replace(CTX, dns_forward=DNS_FWD, dns_upstream=UPSTREAM)
    assert target_for(relay, fwd4, 53) == UPSTREAM[0].packed
    assert target_for(relay, DNS_FWD[1].packed, 53) == UPSTREAM[1].packed
    v6_only = replace(relay, dns_upstream=(IPv6Address("::1"),))
    assert target_for(v6_only, fwd4, 53) == IPv6Address("::1").packed  # other family
    assert target_for(relay, fwd4, 54) == fwd4  # only port 53 is DNS
    assert target_for(replace(relay, dns_upstream=()), fwd4, 53) == fwd4  # no resolver known: left alone


def test_host_peers_as_seen_by_the_guest() -> None:
    assert remote_as_seen(CTX, LOOP4) == GW4
    assert remote_as_seen(CTX, bytes(15) + b"\x01") == IPv6Address("fd77::2").packed
    assert remote_as_seen(CTX, FAR4) == FAR4
    # --no-map-gw: a loopback source still cannot reach the guest as it is; passt shows it as the gateway.
    assert remote_as_seen(Context(ip4=CTX.ip4, map_gw=False), LOOP4) == CTX.ip4.gateway.packed


def test_reply_to_guest_comes_from_the_address_it_asked() -> None:
    flow = new_guest_flow(1, False, GUEST4, DNS_FWD[0].packed, 40000, 53, UPSTREAM[0].packed, 0.0)
    tpl = guest_template(flow)
    ip = dpkt.ip.IP(udp_headers(tpl, b"answer") + b"answer")
    assert not tpl.v6
    assert (ip.src, ip.dst, ip.data.sport, ip.data.dport, ip.data.data) == (
        DNS_FWD[0].packed, GUEST4, 53, 40000, b"answer",
    )  # fmt: skip
    assert guest_template(flow) is tpl  # made once per flow (counters: tests/io/test_udp_io.py)


class Unused:
    """Stands for the shell's socket: the core only checks a flow has one, and never calls it."""

    def fileno(self) -> int:
        raise AssertionError("the core made a system call")

    send = sendto = sendmsg = recv_into = close = fileno


def core_with_flows(*ports: int) -> tuple[UdpCore, list[UdpFlow]]:
    core = UdpCore(CTX, FlowTable(), Stats(), Guest())
    flows = []
    for port in ports:
        flow = core.admit(False, GUEST4, GW4, port, 9999, 0.0)
        assert isinstance(flow, UdpFlow)
        assert core.register(flow, Unused()) == ""  # type: ignore[arg-type]
        flows.append(flow)
    return core, flows


def test_gathering_happens_only_inside_a_batch_of_several_frames() -> None:
    core, (a,) = core_with_flows(1000)
    assert core.gather(a, memoryview(b"x" * 100)) == SEND_ALONE  # no batch: request/response
    core.begin_batch(1)
    assert core.gather(a, memoryview(b"x" * 100)) == SEND_ALONE  # a batch of one frame
    core.end_batch()
    core.begin_batch(5)
    assert core.gather(a, memoryview(b"a" * 100)) == GATHERED
    assert core.gather(a, memoryview(b"b" * 100)) == GATHERED
    assert core.gather(a, memoryview(b"c" * 40)) == RUN_COMPLETE  # shorter: the last segment
    taken = core.take_run()
    assert taken is not None
    flow, data, size, count = taken
    assert (flow, bytes(data), size, count) == (a, b"a" * 100 + b"b" * 100 + b"c" * 40, 100, 3)
    assert core.take_run() is None
    assert core.gather(a, memoryview(b"")) == SEND_ALONE  # an empty datagram is never gathered


def test_another_flow_or_a_bigger_datagram_sends_the_run_first() -> None:
    core, (a, b) = core_with_flows(1000, 1001)
    core.begin_batch(10)
    assert core.gather(a, memoryview(b"a" * 10)) == GATHERED
    assert core.gather(b, memoryview(b"b" * 10)) == FLUSH_FIRST
    assert core.gather(a, memoryview(b"a" * 11)) == FLUSH_FIRST
    taken = core.take_run()
    assert taken is not None and taken[0] is a and bytes(taken[1]) == b"a" * 10
    assert core.gather(b, memoryview(b"b" * 10)) == GATHERED


def test_a_datagram_bigger_than_the_run_buffer_is_sent_alone_and_the_run_stays_intact() -> None:
    """14.1: the run's buffer was resized by an oversized datagram while a view of it was exported
    (BufferError), and the run's stale bytes then went to the other flow."""
    core, (a, b) = core_with_flows(1000, 1001)
    core.begin_batch(10)
    for _ in range(3):
        assert core.gather(a, memoryview(b"a" * 1400)) == GATHERED
    held = core.take_run()  # the shell holds a view while it sends
    assert held is not None
    for big in (GSO_MAX_BYTES + 1, 65507):
        assert core.gather(b, memoryview(b"H" * big)) == SEND_ALONE
        assert core.run_flow is None
    assert bytes(held[1]) == b"a" * 4200
    assert core.gather(b, memoryview(b"h" * GSO_MAX_BYTES)) == GATHERED  # exactly the buffer: fits
    assert core.gather(b, memoryview(b"h")) == FLUSH_FIRST  # no room left: the full run goes first
    assert core.take_run() is not None


def test_flows_beyond_the_udp_cap_are_refused_with_port_unreachable() -> None:
    core, _ = core_with_flows(*range(1000, 1003))
    core.flows.set_cap(17, 3)
    assert core.admit(False, GUEST4, GW4, 2000, 9999, 0.0) == "limit.udp_flows"
    assert core.stats.dropped["limit.udp_flows"] == 1
    assert core.admit(False, GUEST4, GW4, 2000, 0, 0.0) == "udp.port_zero"
    packet = port_unreachable(False, GUEST4, GW4, 2000, 9999, memoryview(b"payload!!"))
    ip = dpkt.ip.IP(packet)
    assert (ip.src, ip.dst, ip.p, ip.data.type, ip.data.code) == (GW4, GUEST4, 1, 3, 3)
    quoted = dpkt.ip.IP(bytes(ip.data.data)[4:])  # after the unused word: the datagram's IP header, 8 bytes
    assert (quoted.src, quoted.dst, quoted.p) == (GUEST4, GW4, 17)
    assert bytes(ip.data.data)[4 + 20 : 4 + 24] == struct.pack("!HH", 2000, 9999)
    assert dpkt.in_cksum(bytes(packet[20:])) == 0
    g6, r6 = IPv6Address("fd77::1").packed, IPv6Address("2001:db8::1").packed
    packet6 = port_unreachable(True, g6, r6, 2000, 53, memoryview(b"q" * 3000))
    ip6 = dpkt.ip6.IP6(packet6)
    assert (ip6.src, ip6.dst, ip6.nxt, packet6[40], packet6[41]) == (r6, g6, 58, 1, 4)
    assert len(packet6) <= 1280  # RFC 4443: fits the minimum MTU
    assert packet6[48 + 8 : 48 + 24] == g6  # the quoted IPv6 header's source


def test_expiry_and_forgetting_drop_every_reference() -> None:
    core, (a, b) = core_with_flows(1000, 1001)
    assert core.find(GUEST4, GW4, 1000, 9999) is a and core.last is a
    a.last_active, b.last_active = 0.0, 50.0
    assert core.expired(100.0, 60.0) == [a]
    core.forget(a)
    assert core.last is None and core.find(GUEST4, GW4, 1000, 9999) is None
    assert len(core.flows) == 1 and core.flows.count(17) == 1
