"""IPv4 header parse/build (RFC 791). Options are skipped, fragments are flagged for the caller to drop."""

from __future__ import annotations

import builtins
import struct
from typing import Final

from passtd.dataplane.packets.checksum import checksum
from passtd.errors import MalformedFrame

IPV4_HLEN: Final = 20
_IP4 = struct.Struct("!BBHHHBBH4s4s")


class Ip4Header:
    """A plain class, not a NamedTuple: compiled, its constructor is a direct call (a NamedTuple's
    `__new__` is interpreted code), and one is made per frame."""

    __slots__ = ("dst", "frag", "ident", "ihl", "payload", "proto", "src", "tos", "total_len", "ttl")

    def __init__(
        self,
        ihl: int,
        tos: int,
        total_len: int,
        ident: int,
        frag: int,
        ttl: int,
        proto: int,
        src: bytes,
        dst: bytes,
        payload: builtins.memoryview,
    ) -> None:
        self.ihl: Final = ihl
        self.tos: Final = tos
        self.total_len: Final = total_len
        self.ident: Final = ident
        self.frag: Final = frag  # flags+offset word
        self.ttl: Final = ttl
        self.proto: Final = proto
        self.src: Final = src
        self.dst: Final = dst
        self.payload: Final = payload  # not a bare `memoryview`, for mypyc: see passtd/native.py

    @property
    def is_fragment(self) -> bool:
        """More-fragments set or a non-zero offset (RFC 791 §3.1)."""
        return bool(self.frag & 0x3FFF)


def parse_ipv4(packet: memoryview) -> Ip4Header:
    """Validate lengths against what arrived; the payload is cut at total_len (Ethernet may pad)."""
    if len(packet) < IPV4_HLEN:
        raise MalformedFrame("ipv4.truncated")
    vihl, tos, total_len, ident, frag, ttl, proto, _csum, src, dst = _IP4.unpack_from(packet)
    if vihl >> 4 != 4:
        raise MalformedFrame("ipv4.bad_version")
    ihl = (vihl & 0x0F) * 4
    if ihl < IPV4_HLEN:
        raise MalformedFrame("ipv4.bad_ihl")
    if total_len < ihl or total_len > len(packet):
        raise MalformedFrame("ipv4.bad_length")
    return Ip4Header(ihl, tos, total_len, ident, frag, ttl, proto, src, dst, packet[ihl:total_len])


def build_ipv4_header(
    src: bytes, dst: bytes, proto: int, payload_len: int, ttl: int = 64, ident: int = 0, tos: int = 0
) -> bytes:
    """20-byte header with DF set and a valid header checksum."""
    hdr = bytearray(_IP4.pack(0x45, tos, IPV4_HLEN + payload_len, ident, 0x4000, ttl, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr)
