"""UDP (RFC 768) parse, and whole IPv4/IPv6 datagram builders for replies to the guest.

The per-datagram path toward the guest uses a `UdpTemplate`: everything in the IP and UDP headers that is
fixed for one flow (addresses, ports, and their share of both checksums) is computed once, so a datagram
costs one `int.from_bytes` over its payload and one `struct.pack` for its headers.
"""

from __future__ import annotations

import builtins
import struct
from dataclasses import dataclass
from typing import Final

from passtd.dataplane.packets.checksum import IPPROTO_UDP, l4_checksum4, l4_checksum6, ones_sum
from passtd.dataplane.packets.ipv4 import build_ipv4_header
from passtd.dataplane.packets.ipv6 import build_ipv6_header
from passtd.dataplane.packets.vnet import ETH_HLEN, F_NEEDS_CSUM, GSO_NONE
from passtd.errors import MalformedFrame

UDP_HLEN: Final = 8
UDP_CSUM_OFFSET: Final = 6  # RFC 768: the checksum field within the UDP header
_UDP = struct.Struct("!HHHH")
# IPv4 (RFC 791 §3.1, DF set, TTL 64, ident 0) + UDP: version/IHL+TOS, total length, ident+flags/offset,
# TTL+protocol, header checksum, addresses+ports, UDP length, UDP checksum.
_HDR4 = struct.Struct("!HHIHH12sHH")
# IPv6 (RFC 8200 §3, hop limit 255) + UDP: version/class/label, payload length, next header+hop limit,
# addresses+ports, UDP length, UDP checksum.
_HDR6 = struct.Struct("!IHH36sHH")
_IP4_FIXED: Final = 0x4500 + 0x4000 + (64 << 8 | IPPROTO_UDP)  # the IPv4 header words that never change
_VNET = struct.Struct("<BBHHHH")  # virtio_net_hdr (virtio spec §5.1.6), host byte order as in vnet.py


class UdpHeader:
    """A plain class, not a NamedTuple: compiled, its constructor is a direct call (a NamedTuple's
    `__new__` is interpreted code), and one is made per frame."""

    __slots__ = ("dport", "length", "payload", "sport")

    def __init__(self, sport: int, dport: int, length: int, payload: builtins.memoryview) -> None:
        self.sport: Final = sport
        self.dport: Final = dport
        self.length: Final = length
        self.payload: Final = payload  # not a bare `memoryview`, for mypyc: see passtd/native.py


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


@dataclass(frozen=True, slots=True)
class UdpTemplate:
    """The fixed part of one flow's IP+UDP headers. Sums are kept unfolded modulo 0xFFFF (RFC 1071 §2:
    the ones'-complement sum of 16-bit words is congruent to the whole buffer read as a number)."""

    v6: bool
    fixed: bytes  # source and destination address, source and destination port, as on the wire
    ip_sum: int  # IPv4 header words except total length and checksum (0 for IPv6, which has no checksum)
    pseudo_sum: int  # pseudo-header addresses and protocol (RFC 768; RFC 8200 §8.1), without the length
    l4_sum: int  # pseudo_sum plus both ports: all of the UDP checksum that is fixed for the flow


def udp_template(src: bytes, dst: bytes, sport: int, dport: int) -> UdpTemplate:
    """Template for datagrams from src:sport to dst:dport (4-byte addresses: IPv4, 16-byte: IPv6)."""
    addrs = int.from_bytes(src + dst, "big") % 0xFFFF
    pseudo = addrs + IPPROTO_UDP
    fixed = src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    v6 = len(src) == 16
    return UdpTemplate(v6, fixed, 0 if v6 else _IP4_FIXED + addrs, pseudo, pseudo + sport + dport)


def udp_headers(tpl: UdpTemplate, payload: bytes | bytearray | memoryview) -> bytes:
    """IPv4 (20 bytes) or IPv6 (40 bytes) header plus UDP header for `payload`, both checksums complete
    (RFC 768: a computed checksum of zero is sent as 0xFFFF). Byte for byte what build_udp4/6 produce."""
    ulen = UDP_HLEN + len(payload)
    # The length counts twice: in the pseudo-header and in the UDP header. The total is never 0, so a
    # remainder of 0 means a sum of 0xFFFF (negative zero) and a checksum of 0, which goes out as 0xFFFF.
    return _headers(tpl, ulen, 0xFFFF - (tpl.l4_sum + 2 * ulen + ones_sum(payload)) % 0xFFFF)


def udp_headers_partial(tpl: UdpTemplate, payload_len: int) -> bytes:
    """Like `udp_headers`, but the UDP checksum field holds only the folded pseudo-header sum, for a frame
    whose checksum the kernel completes (virtio NEEDS_CSUM, see `udp_offload_vnet_header`)."""
    ulen = UDP_HLEN + payload_len
    return _headers(tpl, ulen, (tpl.pseudo_sum + ulen) % 0xFFFF or 0xFFFF)


def _headers(tpl: UdpTemplate, ulen: int, csum: int) -> bytes:
    if tpl.v6:
        return _HDR6.pack(0x60000000, ulen, IPPROTO_UDP << 8 | 255, tpl.fixed, ulen, csum)
    total = 20 + ulen
    ip = (tpl.ip_sum + total) % 0xFFFF
    return _HDR4.pack(
        0x4500, total, 0x4000, 64 << 8 | IPPROTO_UDP, 0xFFFF - ip if ip else 0, tpl.fixed, ulen, csum
    )


def udp_offload_vnet_header(v6: bool) -> bytes:
    """virtio-net header (virtio spec §5.1.6.2) asking the kernel to finish the UDP checksum of a frame
    built with `udp_headers_partial`: checksum from the UDP header to the end, stored at offset 6."""
    start = ETH_HLEN + (40 if v6 else 20)
    return _VNET.pack(F_NEEDS_CSUM, GSO_NONE, start + UDP_HLEN, 0, start, UDP_CSUM_OFFSET)
