"""Sort frames from the guest: L2/L3 services answer at once, flows get actions for the shell to run.

This is passt's tap.c sorting step, without I/O: `handle_frame` appends reply frames to `out` and socket
work to `actions`. Every way a frame can be refused ends in a `MalformedFrame` (counted per reason by the
caller) or a `Stats.drop` with a reason; nothing else escapes.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.flowtable import FlowTable, FlowTableFull
from passtd.dataplane.core.icmp import EchoToHost, echo_from_guest
from passtd.dataplane.core.services.arp import handle_arp
from passtd.dataplane.core.services.dhcp import handle_dhcp
from passtd.dataplane.core.services.dhcpv6 import handle_dhcpv6
from passtd.dataplane.core.services.ndp import NdpResponder
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.tcp.handler import TcpHandler
from passtd.dataplane.packets.checksum import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from passtd.dataplane.packets.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, parse_ethernet
from passtd.dataplane.packets.icmp import ICMPV6_ECHO_REQUEST
from passtd.dataplane.packets.ipv4 import parse_ipv4
from passtd.dataplane.packets.ipv6 import parse_ipv6
from passtd.dataplane.packets.tcp import parse_tcp
from passtd.dataplane.packets.udp import UdpHeader, parse_udp
from passtd.errors import MalformedFrame

_NDP_TYPES = frozenset((133, 134, 135, 136, 137))
_UNSPECIFIED4 = bytes(4)
_UNSPECIFIED6 = bytes(16)


class FrameSink(Protocol):
    """Where reply frames go (the shell's batch list)."""

    def append(self, frame: bytes, /) -> None: ...


UdpSink = Callable[[bool, bytes, bytes, UdpHeader, float], None]


class Demux:
    def __init__(
        self,
        ctx: Context,
        guest: Guest,
        stats: Stats,
        flows: FlowTable,
        ndp: NdpResponder,
        tcp: TcpHandler,
        udp: UdpSink | None = None,
    ) -> None:
        self.tcp = tcp
        self.udp = udp
        self.ctx = ctx
        self.guest = guest
        self.stats = stats
        self.flows = flows
        self.ndp = ndp

    def handle_frame(self, frame: memoryview, now: float, out: FrameSink, actions: list[EchoToHost]) -> None:
        eth = parse_ethernet(frame)
        if eth.src[0] & 1:
            raise MalformedFrame("eth.multicast_source")
        if self.guest.mac != eth.src:
            self.guest.mac = eth.src
        if eth.ethertype == ETH_P_IP:
            self._ipv4(eth.src, eth.payload, now, out, actions)
        elif eth.ethertype == ETH_P_IPV6:
            self._ipv6(eth.src, eth.payload, now, out, actions)
        elif eth.ethertype == ETH_P_ARP:
            reply = handle_arp(self.ctx, eth.payload)
            self._reply("arp", reply, out)
        else:
            self.stats.drop("eth.unknown_ethertype")

    def _reply(self, service: str, reply: bytes | None, out: FrameSink) -> None:
        self.stats.handled[service] += 1
        if reply is not None:
            out.append(reply)

    def _udp(self, v6: bool, src: bytes, dst: bytes, udp: UdpHeader, now: float) -> None:
        if self.udp is None or dst[0] == 0xFF or (not v6 and dst[0] >= 224):
            self.stats.drop("udp.no_flow")  # multicast and broadcast are not relayed
            return
        self.udp(v6, src, dst, udp, now)

    def _echo(
        self, v6: bool, src: bytes, dst: bytes, message: memoryview, now: float, actions: list[EchoToHost]
    ) -> None:
        try:
            action = echo_from_guest(self.ctx, self.flows, v6, src, dst, message, now)
        except FlowTableFull:
            self.stats.drop("flow.table_full")
            return
        if action is None:
            self.stats.drop("icmp.not_echo")
        else:
            actions.append(action)

    def _ipv4(
        self, mac: bytes, payload: memoryview, now: float, out: FrameSink, actions: list[EchoToHost]
    ) -> None:
        ip = parse_ipv4(payload)
        if ip.is_fragment:
            self.stats.drop("ipv4.fragment")
            return
        if ip.src != _UNSPECIFIED4 and ip.src[0] != 0xFF:
            self.guest.addrs4.add(IPv4Address(ip.src))
        if ip.proto == IPPROTO_UDP:
            udp = parse_udp(ip.payload)
            if udp.dport == 67:  # our DHCP server, whatever the destination address (passt does the same)
                self._reply("dhcp", handle_dhcp(self.ctx, mac, udp), out)
                return
            self._udp(False, ip.src, ip.dst, udp, now)
        elif ip.proto == IPPROTO_ICMP:
            if not self.ctx.icmp:
                self.stats.drop("icmp.disabled")
                return
            self._echo(False, ip.src, ip.dst, ip.payload, now, actions)
        elif ip.proto == IPPROTO_TCP:
            self.tcp.tap_segment(False, ip.src, ip.dst, parse_tcp(ip.payload), now)
        else:
            self.stats.drop("ipv4.unknown_protocol")

    def _ipv6(
        self, mac: bytes, payload: memoryview, now: float, out: FrameSink, actions: list[EchoToHost]
    ) -> None:
        ip = parse_ipv6(payload)
        if ip.fragment:
            self.stats.drop("ipv6.fragment")
            return
        if ip.src != _UNSPECIFIED6 and ip.src[0] != 0xFF:
            self.guest.addrs6.add(IPv6Address(ip.src))
        if ip.proto == IPPROTO_ICMPV6:
            if len(ip.payload) < 1:
                raise MalformedFrame("icmpv6.truncated")
            icmp_type = ip.payload[0]
            if icmp_type in _NDP_TYPES:
                self._reply("ndp", self.ndp.handle_icmp6(mac, ip, now), out)
            elif icmp_type == ICMPV6_ECHO_REQUEST and self.ctx.icmp:
                self._echo(True, ip.src, ip.dst, ip.payload, now, actions)
            else:
                self.stats.drop("icmpv6.unhandled")
        elif ip.proto == IPPROTO_UDP:
            udp = parse_udp(ip.payload)
            if udp.dport == 547:
                self._reply("dhcpv6", handle_dhcpv6(self.ctx, mac, ip, udp), out)
                return
            self._udp(True, ip.src, ip.dst, udp, now)
        elif ip.proto == IPPROTO_TCP:
            self.tcp.tap_segment(True, ip.src, ip.dst, parse_tcp(ip.payload), now)
        else:
            self.stats.drop("ipv6.unknown_protocol")
