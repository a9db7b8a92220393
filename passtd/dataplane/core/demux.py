"""Sort frames from the guest: L2/L3 services answer at once, flows get actions for the shell to run.

This is passt's tap.c sorting step, without I/O: `handle_frame` appends reply frames to `out` and socket
work to `actions`. Every way a frame can be refused ends in a `MalformedFrame` (counted per reason by the
caller) or a `Stats.drop` with a reason; nothing else escapes. With --no-tcp / --no-udp the guest's TCP
segments / UDP datagrams are dropped and counted (`tcp.disabled`, `udp.disabled`) before any parsing; the
DHCP and DHCPv6 servers answer regardless, as passt's do.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.egress import Egress
from passtd.dataplane.core.flowtable import FlowTable, FlowTableFull
from passtd.dataplane.core.icmp import EchoToHost, echo_from_guest
from passtd.dataplane.core.limits import GUEST_ADDRS_MAX
from passtd.dataplane.core.services.arp import handle_arp
from passtd.dataplane.core.services.dhcp import handle_dhcp
from passtd.dataplane.core.services.dhcpv6 import handle_dhcpv6
from passtd.dataplane.core.services.ndp import NdpResponder
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.packets.checksum import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from passtd.dataplane.packets.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, parse_ethernet
from passtd.dataplane.packets.icmp import ICMPV6_ECHO_REQUEST
from passtd.dataplane.packets.ipv4 import parse_ipv4
from passtd.dataplane.packets.ipv6 import parse_ipv6
from passtd.dataplane.packets.tcp import SYN, TcpHeader, parse_tcp
from passtd.dataplane.packets.udp import UdpHeader, parse_udp
from passtd.errors import MalformedFrame

_NDP_TYPES = frozenset((133, 134, 135, 136, 137))
# Ethernet, IPv4 (total length, fragment word, addresses) and TCP up to the window, for the fast path
_FAST4 = struct.Struct("!6s6s4xH2xH4x4s4sHHIIBBH")
_FAST6 = struct.Struct("!6s6s2xIH2x16s16sHHIIBBH")
_FAST_UDP4 = struct.Struct("!6s6s4xH2xH4x4s4sHHH")
_FAST_UDP6 = struct.Struct("!6s6s2xIH2x16s16sHHH")
_UNSPECIFIED4 = bytes(4)
_UNSPECIFIED6 = bytes(16)


class FrameSink(Protocol):
    """Where reply frames go (the shell's batch list)."""

    def append(self, frame: bytes, /) -> None: ...


# The TCP and UDP handlers' entry points: (v6, source, destination, header, now).
TcpSink = Callable[[bool, bytes, bytes, TcpHeader, float], None]
UdpSink = Callable[[bool, bytes, bytes, UdpHeader, float], None]


class Demux:
    def __init__(
        self,
        ctx: Context,
        guest: Guest,
        stats: Stats,
        flows: FlowTable,
        ndp: NdpResponder,
        tcp: TcpSink,
        udp: UdpSink | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.egress = egress  # the egress rules for new echo flows (TCP and UDP check theirs in their cores)
        self.tcp = tcp
        self.udp = udp
        self.ctx = ctx
        self.guest = guest
        self.stats = stats
        self.flows = flows
        self.ndp = ndp
        self._tcp_on = ctx.tcp  # --no-tcp / --no-udp: the fast paths step aside, the general path drops
        self._udp_on = ctx.udp and udp is not None
        self.general_frames = 0  # frames the fast paths left (a test checks the common ones never do)
        self._last4 = b""  # last source address recorded in guest.addrs4/addrs6
        self._last6 = b""

    def handle_frame(self, frame: memoryview, now: float, out: FrameSink, actions: list[EchoToHost]) -> None:
        n = len(frame)
        if n >= 42 and frame[12] == 8 and frame[13] == 0 and frame[14] == 0x45:
            proto = frame[23]
            if (proto == 6 and n >= 54 and self._tcp_on and self._tcp4(frame, now)) or (
                proto == 17 and self._udp_on and self._udp4(frame, now)
            ):
                return
        elif n >= 62 and frame[12] == 0x86 and frame[13] == 0xDD:
            proto = frame[20]
            if (proto == 6 and n >= 74 and self._tcp_on and self._tcp6(frame, now)) or (
                proto == 17 and self._udp_on and self._udp6(frame, now)
            ):
                return
        self.handle_general(frame, now, out, actions)

    def handle_general(
        self, frame: memoryview, now: float, out: FrameSink, actions: list[EchoToHost]
    ) -> None:
        """Every frame the fast paths leave: layer by layer, each codec validating its part."""
        self.general_frames += 1
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

    def _seen(self, mac: bytes, src: bytes) -> None:
        if self.guest.mac != mac:
            self.guest.mac = mac
        self._seen_address(src)

    def _seen_address(self, src: bytes) -> None:
        """Record the guest's source address for the control plane; an address object is made only when the
        source changes, not per frame. At most GUEST_ADDRS_MAX per family: past it new addresses are ignored
        and counted (core/limits.py says why not the oldest evicted)."""
        if len(src) == 4:
            if src != self._last4 and src != _UNSPECIFIED4 and src[0] != 0xFF:
                self._last4 = src
                addrs4 = self.guest.addrs4
                addr4 = IPv4Address(src)
                if len(addrs4) < GUEST_ADDRS_MAX:
                    addrs4.add(addr4)
                elif addr4 not in addrs4:
                    self.stats.drop("limit.guest_addresses")
        elif src != self._last6 and src != _UNSPECIFIED6 and src[0] != 0xFF:
            self._last6 = src
            addrs6 = self.guest.addrs6
            addr6 = IPv6Address(src)
            if len(addrs6) < GUEST_ADDRS_MAX:
                addrs6.add(addr6)
            elif addr6 not in addrs6:
                self.stats.drop("limit.guest_addresses")

    def _tcp4(self, frame: memoryview, now: float) -> bool:
        """The common frame, TCP in IPv4 without IP options, in one unpack and without a NamedTuple per
        layer. Anything unusual (a SYN's options, a fragment, a length that does not add up, a multicast
        source) returns False and goes the general way, which validates and counts it."""
        (_dmac, smac, total, frag, src, dst, sport, dport, seq, ack, off, flags, window) = _FAST4.unpack_from(
            frame
        )
        doff = (off >> 4) * 4
        if (
            smac[0] & 1
            or frag & 0x3FFF
            or total > len(frame) - 14
            or doff < 20
            or 20 + doff > total
            or (flags & SYN and doff > 20)
        ):
            return False
        self._seen(smac, src)
        header = TcpHeader(sport, dport, seq, ack, flags, window, 0, -1, frame[34 + doff : 14 + total])
        self.tcp(False, src, dst, header, now)
        return True

    def _tcp6(self, frame: memoryview, now: float) -> bool:
        """As `_tcp4`, for TCP directly after the IPv6 header (no extension headers)."""
        (_dmac, smac, vtcfl, plen, src, dst, sport, dport, seq, ack, off, flags, window) = _FAST6.unpack_from(
            frame
        )
        doff = (off >> 4) * 4
        if (
            smac[0] & 1
            or vtcfl >> 28 != 6
            or plen > len(frame) - 54
            or doff < 20
            or doff > plen
            or (flags & SYN and doff > 20)
        ):
            return False
        self._seen(smac, src)
        header = TcpHeader(sport, dport, seq, ack, flags, window, 0, -1, frame[54 + doff : 54 + plen])
        self.tcp(True, src, dst, header, now)
        return True

    def _udp4(self, frame: memoryview, now: float) -> bool:
        """As `_tcp4`, for a unicast UDP datagram that is not for our DHCP server."""
        _dmac, smac, total, frag, src, dst, sport, dport, length = _FAST_UDP4.unpack_from(frame)
        if (
            self.udp is None
            or smac[0] & 1
            or frag & 0x3FFF
            or total > len(frame) - 14
            or length < 8
            or 20 + length > total
            or dport == 67
            or dst[0] >= 224
        ):
            return False
        self._seen(smac, src)
        self.udp(False, src, dst, UdpHeader(sport, dport, length, frame[42 : 34 + length]), now)
        return True

    def _udp6(self, frame: memoryview, now: float) -> bool:
        """As `_udp4`, for UDP directly after the IPv6 header; DHCPv6 and multicast go the general way."""
        _dmac, smac, vtcfl, plen, src, dst, sport, dport, length = _FAST_UDP6.unpack_from(frame)
        if (
            self.udp is None
            or smac[0] & 1
            or vtcfl >> 28 != 6
            or plen > len(frame) - 54
            or length < 8
            or length > plen
            or dport == 547
            or dst[0] == 0xFF
        ):
            return False
        self._seen(smac, src)
        self.udp(True, src, dst, UdpHeader(sport, dport, length, frame[62 : 54 + length]), now)
        return True

    def _reply(self, service: str, reply: bytes | None, out: FrameSink) -> None:
        self.stats.handled[service] += 1
        if reply is not None:
            out.append(reply)

    def _udp(self, v6: bool, src: bytes, dst: bytes, udp: UdpHeader, now: float) -> None:
        if not self.ctx.udp:
            self.stats.drop("udp.disabled")
            return
        if self.udp is None or dst[0] == 0xFF or (not v6 and dst[0] >= 224):
            self.stats.drop("udp.no_flow")  # multicast and broadcast are not relayed
            return
        self.udp(v6, src, dst, udp, now)

    def _echo(
        self, v6: bool, src: bytes, dst: bytes, message: memoryview, now: float, actions: list[EchoToHost]
    ) -> None:
        try:
            action = echo_from_guest(self.ctx, self.flows, v6, src, dst, message, now, self.egress)
        except FlowTableFull as exc:
            self.stats.drop(exc.reason)
            return
        if action is None:
            self.stats.drop("icmp.not_echo")
        elif isinstance(action, str):
            self.stats.drop(action)
        else:
            actions.append(action)

    def _ipv4(
        self, mac: bytes, payload: memoryview, now: float, out: FrameSink, actions: list[EchoToHost]
    ) -> None:
        ip = parse_ipv4(payload)
        if ip.is_fragment:
            self.stats.drop("ipv4.fragment")
            return
        self._seen_address(ip.src)
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
            if not self._tcp_on:
                self.stats.drop("tcp.disabled")
                return
            self.tcp(False, ip.src, ip.dst, parse_tcp(ip.payload), now)
        else:
            self.stats.drop("ipv4.unknown_protocol")

    def _ipv6(
        self, mac: bytes, payload: memoryview, now: float, out: FrameSink, actions: list[EchoToHost]
    ) -> None:
        ip = parse_ipv6(payload)
        if ip.fragment:
            self.stats.drop("ipv6.fragment")
            return
        self._seen_address(ip.src)
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
            if not self._tcp_on:
                self.stats.drop("tcp.disabled")
                return
            self.tcp(True, ip.src, ip.dst, parse_tcp(ip.payload), now)
        else:
            self.stats.drop("ipv6.unknown_protocol")
