"""Egress rules where flows are admitted, pure: a denied SYN gets RST and no socket, a denied UDP datagram
gets no flow and an administratively-prohibited error, a denied echo gets nothing. The namespace tests
(tests/netns/test_egress.py) show the same through a real guest stack."""

from __future__ import annotations

from ipaddress import IPv6Address

import dpkt

from passtd.dataplane.core.context import Guest
from passtd.dataplane.core.egress import (
    Egress,
    make_policy,
    make_rule,
    parse_network,
    parse_ports,
    parse_proto,
)
from passtd.dataplane.core.flowtable import PROTO_ICMP, PROTO_TCP, PROTO_UDP, FlowTable
from passtd.dataplane.core.icmp import EGRESS_DENIED_ICMP, EchoToHost, echo_from_guest
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.udp import EGRESS_DENIED_UDP, UdpCore, UdpFlow, port_unreachable
from passtd.dataplane.packets.icmp import ICMP_ECHO_REQUEST, build_echo
from passtd.dataplane.packets.tcp import ACK, RST, SYN
from tests.helpers.tcpfake import CTX, FAR4, GUEST4, GW4, Rig


def deny(net: str, proto: str = "any", ports: str = "") -> Egress:
    egress = Egress()
    egress.set(make_policy([make_rule(1, False, parse_network(net), parse_proto(proto), parse_ports(ports))]))
    return egress


def test_denied_syn_is_reset_at_once_without_a_socket() -> None:
    rig = Rig()
    rig.handler.egress.set(deny("10.77.0.2/32", "tcp").current)  # the gateway: the host's loopback
    rig.guest(SYN, 1000, dst=GW4)
    (rst,) = rig.take()
    assert rst.flags == RST | ACK and rst.tcp.ack == 1001 and (rst.src, rst.tcp.sport) == (GW4, 5000)
    assert rig.factory.socks == [] and len(rig.flows) == 0
    assert rig.stats.dropped["egress.tcp"] == 1 and rig.handler.egress.matches == {1: 1}
    rig.guest(SYN, 2000, dst=FAR4)  # another destination: default allow, connect() as usual
    assert len(rig.factory.socks) == 1 and rig.take() == []
    assert rig.handler.egress.denied[PROTO_TCP] == 1


def test_established_segments_never_consult_the_rules() -> None:
    rig = Rig()
    rig.guest(SYN, 1000, dst=FAR4)
    conn = rig.conn()
    rig.handler.sock_connected(conn, 0.0)
    (synack,) = rig.take()
    rig.handler.egress.set(deny("0.0.0.0/0").current)  # denies everything from now on
    rig.guest(ACK, 1001, synack.tcp.seq + 1, data=b"hello", dst=FAR4)
    assert rig.factory.socks[0].tx == bytearray(b"hello")
    assert rig.handler.egress.matches == {}  # the existing flow was not looked at


def test_denied_udp_gets_no_flow_and_prohibited_error() -> None:
    egress = deny("10.88.0.0/16", "udp", "53")
    core = UdpCore(CTX, FlowTable(), Stats(), Guest(), egress=egress)
    assert core.admit(False, GUEST4, FAR4, 4000, 53, 0.0) == EGRESS_DENIED_UDP
    assert isinstance(core.admit(False, GUEST4, FAR4, 4000, 54, 0.0), UdpFlow)
    assert core.stats.dropped[EGRESS_DENIED_UDP] == 1 and egress.denied[PROTO_UDP] == 1
    v4 = dpkt.ip.IP(port_unreachable(False, GUEST4, FAR4, 4000, 53, memoryview(b"q"), prohibited=True))
    assert (v4.src, v4.dst, v4.data.type, v4.data.code) == (FAR4, GUEST4, 3, 13)
    g6, r6 = IPv6Address("fd77::1").packed, IPv6Address("2001:db8::1").packed
    v6 = dpkt.ip6.IP6(port_unreachable(True, g6, r6, 4000, 53, memoryview(b"q"), prohibited=True))
    assert (v6.data.type, v6.data.code) == (1, 1)
    plain = dpkt.ip.IP(port_unreachable(False, GUEST4, FAR4, 4000, 53, memoryview(b"q")))
    assert (plain.data.type, plain.data.code) == (3, 3)


def test_denied_echo_gets_nothing_and_an_existing_echo_flow_keeps_going() -> None:
    table = FlowTable()
    egress = deny("10.88.0.1/32", "icmp")
    request = memoryview(build_echo(ICMP_ECHO_REQUEST, 7, 1, b"ping"))
    assert echo_from_guest(CTX, table, False, GUEST4, FAR4, request, 0.0, egress) == EGRESS_DENIED_ICMP
    assert len(table) == 0 and egress.denied[PROTO_ICMP] == 1
    allowed = echo_from_guest(CTX, table, False, GUEST4, GW4, request, 0.0, egress)
    assert isinstance(allowed, EchoToHost) and allowed.new
    egress.set(deny("0.0.0.0/0", "icmp").current)
    again = echo_from_guest(CTX, table, False, GUEST4, GW4, request, 1.0, egress)
    assert isinstance(again, EchoToHost) and not again.new  # rules decide new flows only
    assert egress.would_deny(PROTO_ICMP, GW4, 0) and not egress.would_deny(PROTO_TCP, GW4, 1)
