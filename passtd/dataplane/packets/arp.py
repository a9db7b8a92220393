"""ARP for IPv4 over Ethernet (RFC 826)."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from passtd.errors import MalformedFrame

ARP_REQUEST: Final = 1
ARP_REPLY: Final = 2
ARP_LEN: Final = 28
_ARP = struct.Struct("!HHBBH6s4s6s4s")


class ArpPacket(NamedTuple):
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


def parse_arp(payload: memoryview) -> ArpPacket:
    """Only Ethernet/IPv4 ARP is meaningful here; anything else is malformed for our purposes."""
    if len(payload) < ARP_LEN:
        raise MalformedFrame("arp.truncated")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(payload)
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        raise MalformedFrame("arp.unsupported")
    return ArpPacket(op, sha, spa, tha, tpa)


def build_arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return _ARP.pack(1, 0x0800, 6, 4, op, sha, spa, tha, tpa)
