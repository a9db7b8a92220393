"""TCP header parse (RFC 9293 §3.1) with bounded option walking, and segment builders toward the guest.

Option parsing stops at End-of-Option-List, steps over NOPs, and rejects any other option whose length is
below 2 or runs past the header: the reference C loops forever on a zero length, we raise MalformedFrame.
"""

from __future__ import annotations

import builtins
import struct
from typing import Final

from passtd.dataplane.packets.checksum import IPPROTO_TCP, checksum, ones_sum, pseudo_header4, pseudo_header6
from passtd.errors import MalformedFrame

TCP_HLEN: Final = 20
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20

OPT_EOL: Final = 0
OPT_NOP: Final = 1
OPT_MSS: Final = 2
OPT_WS: Final = 3
OPT_SACK_PERM: Final = 4
MAX_WS: Final = 14  # RFC 7323 §2.3

_TCP = struct.Struct("!HHIIBBHHH")


class TcpHeader:
    """A plain class, not a NamedTuple: compiled, its constructor is a direct call (a NamedTuple's
    `__new__` is interpreted code), and one is made per frame."""

    __slots__ = ("ack", "dport", "flags", "mss", "payload", "seq", "sport", "window", "ws")

    def __init__(
        self,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        mss: int,
        ws: int,
        payload: builtins.memoryview,
    ) -> None:
        self.sport: Final = sport
        self.dport: Final = dport
        self.seq: Final = seq
        self.ack: Final = ack
        self.flags: Final = flags
        self.window: Final = window  # unscaled, as on the wire
        self.mss: Final = mss  # 0 when absent (only meaningful on SYN)
        self.ws: Final = ws  # -1 when absent; clamped to 14
        self.payload: Final = payload  # not a bare `memoryview`, for mypyc: see passtd/native.py


def parse_tcp(segment: memoryview) -> TcpHeader:
    """Parse the header; options are read only on SYN segments, where MSS and window scale matter."""
    if len(segment) < TCP_HLEN:
        raise MalformedFrame("tcp.truncated")
    sport, dport, seq, ack, off, flags, window, _csum, _urg = _TCP.unpack_from(segment)
    doff = (off >> 4) * 4
    if doff < TCP_HLEN or doff > len(segment):
        raise MalformedFrame("tcp.bad_data_offset")
    mss = 0
    ws = -1
    if flags & SYN and doff > TCP_HLEN:
        mss, ws = _parse_options(segment, doff)
    return TcpHeader(sport, dport, seq, ack, flags, window, mss, ws, segment[doff:])


def _parse_options(segment: memoryview, end: int) -> tuple[int, int]:
    mss = 0
    ws = -1
    i = TCP_HLEN
    while i < end:  # every branch advances i by at least 1
        kind = segment[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise MalformedFrame("tcp.option_truncated")
        length = segment[i + 1]
        if length < 2 or i + length > end:
            raise MalformedFrame("tcp.bad_option_length")
        if kind == OPT_MSS and length == 4:
            mss = (segment[i + 2] << 8) | segment[i + 3]
        elif kind == OPT_WS and length == 3:
            ws = min(segment[i + 2], MAX_WS)
        i += length
    return mss, ws


def syn_options(mss: int, ws: int) -> bytes:
    """MSS, then NOP + window scale when `ws` >= 0 (padded to a multiple of 4 bytes)."""
    opts = struct.pack("!BBH", OPT_MSS, 4, mss)
    if ws >= 0:
        opts += bytes((OPT_NOP, OPT_WS, 3, ws))
    return opts


_IP4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")  # an IPv4 header and an option-less TCP header at once
_IP6_TCP = struct.Struct("!IHBB16s16sHHIIBBHHH")
_IP4_CONST = 0x4500 + 0x4000 + (64 << 8 | IPPROTO_TCP)  # version/IHL, DF, TTL 64 and protocol words


def _fold(total: int) -> int:
    """End-around carry down to 16 bits; a non-zero sum never folds to 0 (it becomes 0xFFFF)."""
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


class SegmentBuilder:
    """Builds guest-bound IP+TCP segments for one flow: everything constant about the headers (addresses,
    the pseudo-header sum, the IPv4 header's fixed words) is summed once here, so a segment costs one
    `struct` pack and a few additions (this runs for every frame toward the guest)."""

    __slots__ = ("dport", "dst", "hdr_len", "ip4sum", "offload", "psum", "sport", "src", "v6")

    def __init__(self, src: bytes, dst: bytes, sport: int, dport: int, offload: bool = False) -> None:
        self.offload = offload  # leave the TCP checksum to the kernel (see vnet.py): pseudo-header sum only
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.v6 = len(src) == 16
        # Sum of the pseudo-header without its length field: lengths are added per segment.
        # (Modulo 0xFFFF is all a ones' complement sum needs: `_fold` brings the total into range later.)
        addr_sum = int.from_bytes(src + dst, "big") % 0xFFFF
        self.psum = addr_sum + IPPROTO_TCP
        self.ip4sum = 0 if self.v6 else _IP4_CONST + addr_sum
        self.hdr_len = 40 if self.v6 else 20

    def build(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes | memoryview = b"",
        options: bytes = b"",
    ) -> bytes:
        """IP header + TCP header + payload with both checksums (the L3 one only for IPv4)."""
        headers = self.headers(seq, ack, flags, window, payload, options)
        return headers + payload if payload else headers

    def headers(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes | memoryview = b"",
        options: bytes = b"",
    ) -> bytes:
        """IP and TCP headers (and `options`, a multiple of 4 bytes) for `payload`, which the caller sends
        after them (saving a copy of it). SYNs with options take the same one-pack path."""
        olen = len(options)
        seg_len = TCP_HLEN + olen + len(payload)
        off = 0x50 + (olen << 2)  # data offset in 32-bit words, in the high nibble
        if self.offload:
            csum = _fold(self.psum + seg_len)  # the kernel adds the segment's own sum (NEEDS_CSUM)
        else:
            tcp = _TCP.pack(self.sport, self.dport, seq, ack, off, flags, window, 0, 0)
            csum = ~_fold(self.psum + seg_len + ones_sum(tcp, options, payload)) & 0xFFFF
        if self.v6:
            hdr = _IP6_TCP.pack(6 << 28, seg_len, IPPROTO_TCP, 64, self.src, self.dst,
                                self.sport, self.dport, seq, ack, off, flags, window, csum, 0)  # fmt: skip
        else:
            total = 20 + seg_len
            ipsum = ~_fold(self.ip4sum + total) & 0xFFFF
            hdr = _IP4_TCP.pack(0x45, 0, total, 0, 0x4000, 64, IPPROTO_TCP, ipsum, self.src, self.dst,
                                self.sport, self.dport, seq, ack, off, flags, window, csum, 0)  # fmt: skip
        return hdr + options if olen else hdr


def tcp_checksum_ok(src: bytes, dst: bytes, segment: memoryview) -> bool:
    """Verify a received segment (tests and debugging; the dataplane trusts the guest's kernel)."""
    pseudo = pseudo_header6 if len(src) == 16 else pseudo_header4
    return checksum(pseudo(src, dst, IPPROTO_TCP, len(segment)), segment) == 0
