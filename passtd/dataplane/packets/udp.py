"""UDP (RFC 768) parse, and whole IPv4/IPv6 datagram builders for replies to the guest."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from passtd.dataplane.packets.checksum import IPPROTO_UDP, l4_checksum4, l4_checksum6
from passtd.dataplane.packets.ipv4 import build_ipv4_header
from passtd.dataplane.packets.ipv6 import build_ipv6_header
from passtd.errors import MalformedFrame

UDP_HLEN: Final = 8
_UDP = struct.Struct("!HHHH")


class UdpHeader(NamedTuple):
    sport: int
    dport: int
    length: int
    payload: memoryview


def parse_udp(segment: memoryview) -> UdpHeader:
    """The UDP length must fit what IP carried; bytes past it are ignored (RFC 768)."""
    if len(segment) < UDP_HLEN:
        raise MalformedFrame("udp.truncated")
    sport, dport, length, _csum = _UDP.unpack_from(segment)
    if length < UDP_HLEN or length > len(segment):
        raise MalformedFrame("udp.bad_length")
    return UdpHeader(sport, dport, length, segment[UDP_HLEN:length])


def build_udp4(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes | memoryview) -> bytes:
    """IPv4 header + UDP header + payload, both checksums filled in."""
    length = UDP_HLEN + len(payload)
    udp = bytearray(_UDP.pack(sport, dport, length, 0))
    csum = l4_checksum4(src, dst, IPPROTO_UDP, udp + payload) or 0xFFFF
    struct.pack_into("!H", udp, 6, csum)
    return build_ipv4_header(src, dst, IPPROTO_UDP, length) + udp + payload


def build_udp6(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes | memoryview) -> bytes:
    """IPv6 header + UDP header + payload; the UDP checksum is mandatory over IPv6 (RFC 8200 §8.1)."""
    length = UDP_HLEN + len(payload)
    udp = bytearray(_UDP.pack(sport, dport, length, 0))
    csum = l4_checksum6(src, dst, IPPROTO_UDP, udp + payload) or 0xFFFF
    struct.pack_into("!H", udp, 6, csum)
    return build_ipv6_header(src, dst, IPPROTO_UDP, length) + udp + payload
