"""Frames for the soak: well-formed seeds of every kind the guest may send, and a mutator that bends them.

Nothing here does I/O. `Fuzzer.frame()` returns one frame, drawn from a mix that reaches every layer: frames
generated with random field values but correct checksums (so they pass the early checks and exercise the
protocol code: TCP flags and options, UDP to random ports, echo ids, DHCP/DHCPv6/NDP messages), seeds with a
few bytes flipped, truncated at a random length, length fields that lie, and plain garbage. Addresses are
only those of the soak's own namespaces (documentation ranges) and of the link.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

ETH_IP4, ETH_ARP, ETH_IP6 = 0x0800, 0x0806, 0x86DD
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
BROADCAST = b"\xff" * 6


def _csum(data: bytes) -> int:
    """RFC 1071 internet checksum: the ones' complement sum of 16-bit words is the number mod 0xFFFF (with
    0xFFFF for a non-zero multiple), so one big-integer modulo does it at C speed."""
    if len(data) % 2:
        data += b"\0"
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF
    if s == 0 and n:
        s = 0xFFFF
    return ~s & 0xFFFF


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(
    src: bytes, dst: bytes, proto: int, l4: bytes, ttl: int = 64, ident: int = 0, frag: int = 0x4000
) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, frag, ttl, proto, 0, src, dst)
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + l4


def ipv6(src: bytes, dst: bytes, nh: int, l4: bytes, hlim: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(l4), nh, hlim, src, dst) + l4


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def with_l4_csum(src: bytes, dst: bytes, proto: int, l4: bytes, offset: int) -> bytes:
    """`l4` with its checksum (at `offset`) computed over the pseudo-header."""
    blank = l4[:offset] + b"\0\0" + l4[offset + 2 :]
    value = _csum(_pseudo(src, dst, proto, len(l4)) + blank)
    if proto == UDP and value == 0:
        value = 0xFFFF
    return l4[:offset] + struct.pack("!H", value) + l4[offset + 2 :]


def tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    win: int,
    options: bytes = b"",
    payload: bytes = b"",
) -> bytes:
    options += b"\0" * (-len(options) % 4)
    off = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (off & 0xF) << 4, flags, win, 0, 0)
    return with_l4_csum(src, dst, TCP, hdr + options + payload, 16)


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    return with_l4_csum(src, dst, UDP, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload, 6)


def icmp4_echo(ident: int, seq: int, payload: bytes) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    return body[:2] + struct.pack("!H", _csum(body)) + body[4:]


def icmp6(src: bytes, dst: bytes, kind: int, code: int, body: bytes) -> bytes:
    return with_l4_csum(src, dst, ICMP6, struct.pack("!BBH", kind, code, 0) + body, 2)


def arp_request(mac: bytes, sender: bytes, target: bytes) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP4, 6, 4, 1, mac, sender, b"\0" * 6, target)


def dhcp_discover(mac: bytes, xid: int, options: bytes) -> bytes:
    bootp = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1,
        1,
        6,
        0,
        xid,
        0,
        0x8000,
        b"\0" * 4,
        b"\0" * 4,
        b"\0" * 4,
        b"\0" * 4,
        mac + b"\0" * 10,
        b"",
        b"",
    )
    return bootp + b"\x63\x82\x53\x63" + options + b"\xff"


def dhcpv6(msg_type: int, xid: int, options: bytes) -> bytes:
    return struct.pack("!I", (msg_type << 24) | (xid & 0xFFFFFF)) + options


def ll_of(mac: bytes) -> bytes:
    """The EUI-64 link-local address of `mac`."""
    eui = bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:]
    return b"\xfe\x80" + b"\0" * 6 + eui


@dataclass(frozen=True)
class Link:
    """Who talks on the tap: the guest's MAC and addresses, passtd's MAC, and the targets the soak may use."""

    guest_mac: bytes
    our_mac: bytes
    guest4: bytes
    gateway4: bytes
    guest6: bytes
    targets4: tuple[bytes, ...]
    targets6: tuple[bytes, ...]

    @classmethod
    def build(
        cls,
        guest_mac: str,
        our_mac: str,
        guest4: str,
        gateway4: str,
        guest6: str,
        targets4: tuple[str, ...],
        targets6: tuple[str, ...],
    ) -> Link:
        return cls(
            bytes.fromhex(guest_mac.replace(":", "")),
            bytes.fromhex(our_mac.replace(":", "")),
            IPv4Address(guest4).packed,
            IPv4Address(gateway4).packed,
            IPv6Address(guest6).packed,
            tuple(IPv4Address(a).packed for a in targets4),
            tuple(IPv6Address(a).packed for a in targets6),
        )


KINDS = ("tcp4", "tcp6", "udp4", "udp6", "icmp4", "icmp6", "arp", "dhcp", "ndp", "dhcpv6")
MUTATIONS = ("generated", "generated", "generated", "flip", "truncate", "lenlie", "garbage")


class Fuzzer:
    """Frames for one guest. `frame()` picks a kind and a mutation; `counts` tallies what was made."""

    def __init__(self, link: Link, seed: int, ports: int = 65535, sources: bool = False) -> None:
        self.link = link
        self.rng = random.Random(seed)
        self.ports = ports  # destination ports are drawn from 1..ports (bounds how many flows open)
        self.sources = sources  # random guest source addresses too (learned-address growth)
        self.counts: dict[str, int] = {}

    # -- generated with random fields, checksums right ---------------------------------------------------

    def _src4(self) -> bytes:
        if self.sources and self.rng.random() < 0.5:
            return bytes([192, 0, 2, self.rng.randrange(3, 255)])
        return self.link.guest4

    def _src6(self) -> bytes:
        if self.sources and self.rng.random() < 0.5:
            return self.link.guest6[:8] + self.rng.randbytes(8)
        return self.link.guest6

    def _tcp_options(self) -> bytes:
        r = self.rng
        pick = r.random()
        if pick < 0.4:
            return (
                struct.pack("!BBH", 2, 4, r.choice((0, 1, 536, 1460, 65495, 65535)))
                + b"\x01\x03\x03"
                + bytes([r.randrange(0, 20)])
            )
        if pick < 0.7:
            return r.randbytes(r.randrange(0, 41))  # option soup: lengths 0 and 1 included
        return b""

    def _ports(self) -> tuple[int, int]:
        return self.rng.randrange(1, 65536), self.rng.randrange(1, self.ports + 1)

    def generated(self, kind: str) -> bytes:
        r, k = self.rng, self.link
        if kind in ("tcp4", "tcp6"):
            sport, dport = self._ports()
            flags = r.choice((0x02, 0x02, 0x02, 0x10, 0x12, 0x11, 0x04, 0x18, r.randrange(256)))
            payload = r.randbytes(r.choice((0, 0, 1, 100, 1400)))
            args = (
                sport,
                dport,
                r.getrandbits(32),
                r.getrandbits(32),
                flags,
                r.randrange(65536),
                self._tcp_options(),
                payload,
            )
            if kind == "tcp4":
                src, dst = self._src4(), r.choice(k.targets4)
                return eth(k.our_mac, k.guest_mac, ETH_IP4, ipv4(src, dst, TCP, tcp(src, dst, *args)))
            src, dst = self._src6(), r.choice(k.targets6)
            return eth(k.our_mac, k.guest_mac, ETH_IP6, ipv6(src, dst, TCP, tcp(src, dst, *args)))
        if kind in ("udp4", "udp6"):
            sport, dport = self._ports()
            payload = r.randbytes(r.choice((0, 1, 64, 512, 1400)))
            if kind == "udp4":
                src, dst = self._src4(), r.choice(k.targets4)
                return eth(
                    k.our_mac, k.guest_mac, ETH_IP4, ipv4(src, dst, UDP, udp(src, dst, sport, dport, payload))
                )
            src, dst = self._src6(), r.choice(k.targets6)
            return eth(
                k.our_mac, k.guest_mac, ETH_IP6, ipv6(src, dst, UDP, udp(src, dst, sport, dport, payload))
            )
        if kind == "icmp4":
            src, dst = self._src4(), r.choice(k.targets4)
            body = icmp4_echo(r.randrange(65536), r.randrange(65536), r.randbytes(r.choice((0, 8, 56))))
            if r.random() < 0.2:  # another type: errors, timestamps, unknown
                body = bytes([r.randrange(256), r.randrange(256)]) + body[2:]
                body = body[:2] + struct.pack("!H", _csum(body[:2] + b"\0\0" + body[4:])) + body[4:]
            return eth(k.our_mac, k.guest_mac, ETH_IP4, ipv4(src, dst, ICMP, body))
        if kind == "icmp6":
            src, dst = self._src6(), r.choice(k.targets6)
            kind6 = 128 if r.random() < 0.8 else r.randrange(256)
            body = icmp6(
                src,
                dst,
                kind6,
                0,
                struct.pack("!HH", r.randrange(65536), r.randrange(65536)) + r.randbytes(8),
            )
            return eth(k.our_mac, k.guest_mac, ETH_IP6, ipv6(src, dst, ICMP6, body))
        if kind == "arp":
            target = r.choice((k.gateway4, bytes([192, 0, 2, r.randrange(256)]), r.randbytes(4)))
            return eth(BROADCAST, k.guest_mac, ETH_ARP, arp_request(k.guest_mac, self._src4(), target))
        if kind == "dhcp":
            opts = b"\x35\x01" + bytes([r.choice((1, 3, 4, 7, 8, r.randrange(256)))])
            if r.random() < 0.5:
                opts += r.randbytes(r.randrange(0, 60))  # option soup
            payload = dhcp_discover(k.guest_mac, r.getrandbits(32), opts)
            src, dst = b"\0" * 4, b"\xff" * 4
            return eth(BROADCAST, k.guest_mac, ETH_IP4, ipv4(src, dst, UDP, udp(src, dst, 68, 67, payload)))
        if kind == "ndp":
            src = ll_of(k.guest_mac)
            if r.random() < 0.5:  # router solicitation
                dst = bytes.fromhex("ff020000000000000000000000000002")
                body = icmp6(
                    src, dst, 133, 0, b"\0" * 4 + b"\x01\x01" + k.guest_mac + r.randbytes(r.randrange(0, 16))
                )
            else:  # neighbour solicitation for a random or the gateway's address
                target = r.choice((ll_of(k.our_mac), k.guest6[:8] + r.randbytes(8)))
                dst = bytes.fromhex("ff0200000000000000000001ff") + target[-3:]
                body = icmp6(src, dst, 135, 0, b"\0" * 4 + target + b"\x01\x01" + k.guest_mac)
            return eth(BROADCAST, k.guest_mac, ETH_IP6, ipv6(src, dst, ICMP6, body, hlim=255))
        # dhcpv6: solicit, request, information-request, with option soup
        src, dst = ll_of(k.guest_mac), bytes.fromhex("ff020000000000000000000000010002")
        opts = struct.pack("!HHHH", 1, 10, 3, 1) + k.guest_mac
        if r.random() < 0.5:
            opts += r.randbytes(r.randrange(0, 40))
        payload = dhcpv6(r.choice((1, 3, 11, r.randrange(256))), r.getrandbits(24), opts)
        return eth(BROADCAST, k.guest_mac, ETH_IP6, ipv6(src, dst, UDP, udp(src, dst, 546, 547, payload)))

    # -- mutated ------------------------------------------------------------------------------------------

    def frame(self) -> bytes:
        r = self.rng
        kind = r.choice(KINDS)
        mutation = r.choice(MUTATIONS)
        self.counts[mutation] = self.counts.get(mutation, 0) + 1
        if mutation == "garbage":
            body = r.randbytes(r.randrange(0, 200))
            ethertype = r.choice((ETH_IP4, ETH_IP6, ETH_ARP, r.randrange(65536)))
            return eth(self.link.our_mac, self.link.guest_mac, ethertype, body)[: r.randrange(0, 220)]
        frame = bytearray(self.generated(kind))
        if mutation == "flip":
            for _ in range(r.randrange(1, 9)):
                frame[r.randrange(len(frame))] = r.randrange(256)
        elif mutation == "truncate":
            del frame[r.randrange(0, len(frame)) :]
        elif mutation == "lenlie":
            if frame[12:14] == b"\x08\x00" and len(frame) >= 34:
                frame[16:18] = struct.pack("!H", r.randrange(65536))  # IPv4 total length
                frame[24:26] = b"\0\0"
                frame[24:26] = struct.pack("!H", _csum(bytes(frame[14:34])))
            elif frame[12:14] == b"\x86\xdd" and len(frame) >= 54:
                frame[18:20] = struct.pack("!H", r.randrange(65536))  # IPv6 payload length
            if len(frame) >= 60 and r.random() < 0.5:
                frame[38:40] = struct.pack("!H", r.randrange(65536))  # UDP length or TCP seq bits
        return bytes(frame)


FLOODS = ("syn", "udp_ports", "echo_ids", "sources")


def flood_frame(fuzzer: Fuzzer, what: str) -> bytes:
    """One well-formed frame of a flood: SYNs to a silent address (half-open flows), UDP to random ports,
    echo requests with random ids, UDP from random IPv6 source addresses of the guest's prefix."""
    r, k = fuzzer.rng, fuzzer.link
    if what == "syn":
        src, dst = k.guest4, k.targets4[-1]
        seg = tcp(
            src,
            dst,
            r.randrange(1024, 65536),
            r.randrange(1, 65536),
            r.getrandbits(32),
            0,
            0x02,
            64240,
            struct.pack("!BBH", 2, 4, 1460),
        )
        return eth(k.our_mac, k.guest_mac, ETH_IP4, ipv4(src, dst, TCP, seg))
    if what == "udp_ports":
        src, dst = k.guest4, k.targets4[0]
        return eth(
            k.our_mac,
            k.guest_mac,
            ETH_IP4,
            ipv4(src, dst, UDP, udp(src, dst, r.randrange(1024, 65536), r.randrange(1, 65536), b"x" * 16)),
        )
    if what == "echo_ids":
        src, dst = k.guest4, k.targets4[0]
        return eth(
            k.our_mac,
            k.guest_mac,
            ETH_IP4,
            ipv4(src, dst, ICMP, icmp4_echo(r.randrange(65536), 1, b"x" * 16)),
        )
    src, dst = k.guest6[:8] + r.randbytes(8), k.targets6[0]
    return eth(k.our_mac, k.guest_mac, ETH_IP6, ipv6(src, dst, UDP, udp(src, dst, 40000, 9, b"x" * 16)))
