"""IPv6 header parse/build (RFC 8200) with a bounded walk over extension headers."""

from __future__ import annotations

import builtins
import struct
from typing import Final

from passtd.errors import MalformedFrame

IPV6_HLEN: Final = 40
_IP6 = struct.Struct("!IHBB16s16s")

# RFC 8200 §4: headers that may precede the upper layer and share the (next, len8) layout.
_EXT_HOP_BY_HOP: Final = 0
_EXT_ROUTING: Final = 43
_EXT_FRAGMENT: Final = 44
_EXT_DEST_OPTS: Final = 60
_EXT_NO_NEXT: Final = 59
_MAX_EXT_HEADERS: Final = 8


class Ip6Header:
    """A plain class, not a NamedTuple: compiled, its constructor is a direct call (a NamedTuple's
    `__new__` is interpreted code), and one is made per frame."""

    __slots__ = ("dst", "flow", "fragment", "hop_limit", "payload", "proto", "src")

    def __init__(
        self,
        flow: int,
        hop_limit: int,
        proto: int,
        src: bytes,
        dst: bytes,
        payload: builtins.memoryview,
        fragment: bool,
    ) -> None:
        self.flow: Final = flow  # version/class/label word
        self.hop_limit: Final = hop_limit
        self.proto: Final = proto  # upper-layer protocol after extension headers
        self.src: Final = src
        self.dst: Final = dst
        self.payload: Final = payload  # upper-layer payload
        self.fragment: Final = fragment


def parse_ipv6(packet: memoryview) -> Ip6Header:
    """Parse the fixed header and walk at most a few extension headers, never past payload_len."""
    if len(packet) < IPV6_HLEN:
        raise MalformedFrame("ipv6.truncated")
    vtcfl, payload_len, nxt, hop_limit, src, dst = _IP6.unpack_from(packet)
    if vtcfl >> 28 != 6:
        raise MalformedFrame("ipv6.bad_version")
    end = IPV6_HLEN + payload_len
    if end > len(packet):
        raise MalformedFrame("ipv6.bad_length")
    off = IPV6_HLEN
    fragment = False
    for _ in range(_MAX_EXT_HEADERS):
        if nxt not in (_EXT_HOP_BY_HOP, _EXT_ROUTING, _EXT_FRAGMENT, _EXT_DEST_OPTS):
            break
        if off + 8 > end:
            raise MalformedFrame("ipv6.ext_truncated")
        if nxt == _EXT_FRAGMENT:
            fragment = True
            hlen = 8
        else:
            hlen = (packet[off + 1] + 1) * 8
        if off + hlen > end:
            raise MalformedFrame("ipv6.ext_truncated")
        nxt = packet[off]
        off += hlen
    else:
        raise MalformedFrame("ipv6.too_many_ext")
    return Ip6Header(vtcfl, hop_limit, nxt, src, dst, packet[off:end], fragment)


def build_ipv6_header(src: bytes, dst: bytes, proto: int, payload_len: int, hop_limit: int = 255) -> bytes:
    """40-byte fixed header, no extension headers."""
    return _IP6.pack(6 << 28, payload_len, proto, hop_limit, src, dst)
