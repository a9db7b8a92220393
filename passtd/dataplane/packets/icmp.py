"""ICMP (RFC 792) and ICMPv6 (RFC 4443) headers: echo request/reply and the common type/code prefix."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from passtd.dataplane.packets.checksum import IPPROTO_ICMP, IPPROTO_ICMPV6, checksum, l4_checksum6
from passtd.dataplane.packets.ipv4 import build_ipv4_header
from passtd.dataplane.packets.ipv6 import build_ipv6_header
from passtd.errors import MalformedFrame

ICMP_ECHO_REPLY: Final = 0
ICMP_ECHO_REQUEST: Final = 8
ICMPV6_ECHO_REQUEST: Final = 128
ICMPV6_ECHO_REPLY: Final = 129
ICMP_HLEN: Final = 8
_ICMP = struct.Struct("!BBHHH")


class IcmpHeader(NamedTuple):
    type: int
    code: int
    ident: int  # echo identifier (meaningless for other types)
    seq: int
    body: memoryview  # everything after the 8-byte header


def parse_icmp(message: memoryview) -> IcmpHeader:
    """Both ICMP and ICMPv6 share the 4-byte type/code/checksum prefix and a 4-byte rest-of-header."""
    if len(message) < ICMP_HLEN:
        raise MalformedFrame("icmp.truncated")
    typ, code, _csum, ident, seq = _ICMP.unpack_from(message)
    return IcmpHeader(typ, code, ident, seq, message[ICMP_HLEN:])


def build_echo(typ: int, ident: int, seq: int, data: bytes | memoryview) -> bytearray:
    """Echo message with a zero checksum; the caller fills it in for its family."""
    return bytearray(_ICMP.pack(typ, 0, 0, ident, seq)) + data


def build_icmp4_packet(src: bytes, dst: bytes, message: bytearray, ttl: int = 64) -> bytes:
    """IPv4 packet around an ICMP message whose checksum field is zero."""
    struct.pack_into("!H", message, 2, checksum(message))
    return build_ipv4_header(src, dst, IPPROTO_ICMP, len(message), ttl=ttl) + message


def build_icmp6_packet(src: bytes, dst: bytes, message: bytearray, hop_limit: int = 255) -> bytes:
    """IPv6 packet around an ICMPv6 message whose checksum field is zero (checksum over the pseudo-header)."""
    struct.pack_into("!H", message, 2, l4_checksum6(src, dst, IPPROTO_ICMPV6, message))
    return build_ipv6_header(src, dst, IPPROTO_ICMPV6, len(message), hop_limit=hop_limit) + message
