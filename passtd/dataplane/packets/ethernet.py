"""Ethernet II framing (IEEE 802.3 clause 3); 802.1Q tags are not expected from a point-to-point guest."""

from __future__ import annotations

import builtins
import struct
from typing import Final

from passtd.errors import MalformedFrame

ETH_HLEN: Final = 14
ETH_P_IP: Final = 0x0800
ETH_P_ARP: Final = 0x0806
ETH_P_IPV6: Final = 0x86DD
BROADCAST: Final = b"\xff" * 6

_ETH = struct.Struct("!6s6sH")


class EthHeader:
    """A plain class, not a NamedTuple: compiled, its constructor is a direct call (a NamedTuple's
    `__new__` is interpreted code), and one is made per frame."""

    __slots__ = ("dst", "ethertype", "payload", "src")

    def __init__(self, dst: bytes, src: bytes, ethertype: int, payload: builtins.memoryview) -> None:
        self.dst: Final = dst
        self.src: Final = src
        self.ethertype: Final = ethertype
        self.payload: Final = payload  # not a bare `memoryview`, for mypyc: see passtd/native.py


def parse_ethernet(frame: memoryview) -> EthHeader:
    """Split an Ethernet II frame into its header fields and payload."""
    if len(frame) < ETH_HLEN:
        raise MalformedFrame("eth.truncated")
    dst, src, ethertype = _ETH.unpack_from(frame)
    if ethertype < 0x0600:
        raise MalformedFrame("eth.not_ethernet2")
    return EthHeader(dst, src, ethertype, frame[ETH_HLEN:])


def build_ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes | bytearray | memoryview) -> bytes:
    """A complete frame; no padding, the tap and the qemu socket accept short frames."""
    return _ETH.pack(dst, src, ethertype) + payload


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_from_str(text: str) -> bytes:
    """Parse aa:bb:cc:dd:ee:ff; raises ValueError with a readable message."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) in (1, 2) for p in parts):
        raise ValueError(f"invalid MAC address {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"invalid MAC address {text!r}") from None


def is_multicast(mac: bytes) -> bool:
    return bool(mac[0] & 1)


def ipv6_multicast_mac(addr: bytes) -> bytes:
    """RFC 2464 §7: 33:33 followed by the low 32 bits of the IPv6 multicast address."""
    return b"\x33\x33" + addr[12:16]
