"""Ethernet, IPv4, IPv6, UDP, ICMP and ARP codecs, with dpkt as the oracle."""

from __future__ import annotations

import random

import dpkt
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from passtd.dataplane.packets.arp import ARP_REQUEST, build_arp, parse_arp
from passtd.dataplane.packets.checksum import checksum, ones_sum
from passtd.dataplane.packets.ethernet import (
    ETH_P_IP,
    build_ethernet,
    ipv6_multicast_mac,
    mac_from_str,
    mac_to_str,
    parse_ethernet,
)
from passtd.dataplane.packets.icmp import (
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REPLY,
    build_echo,
    build_icmp4_packet,
    build_icmp6_packet,
    parse_icmp,
)
from passtd.dataplane.packets.ipv4 import build_ipv4_header, parse_ipv4
from passtd.dataplane.packets.ipv6 import build_ipv6_header, parse_ipv6
from passtd.dataplane.packets.udp import build_udp4, build_udp6, parse_udp
from passtd.errors import MalformedFrame

A4 = bytes((10, 0, 0, 1))
B4 = bytes((10, 0, 0, 2))
A6 = bytes.fromhex("fd000000000000000000000000000001")
B6 = bytes.fromhex("fd000000000000000000000000000002")


def fold_checksum(data: bytes) -> int:
    """Textbook RFC 1071 end-around-carry fold, the reference for the big-integer version."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.binary(max_size=3000))
@example(b"\xff\xff")  # a nonzero multiple of 0xFFFF: the 0x0000/0xFFFF case
@example(b"\x00\x00")
@example(b"\xff\xff\xff\xff")
@example(b"\x00")
def test_checksum_equals_fold(data: bytes) -> None:
    assert checksum(data) == fold_checksum(data)


@given(st.binary(max_size=100).map(lambda b: b[: len(b) // 2 * 2]), st.binary(max_size=100))
def test_checksum_of_parts_equals_checksum_of_concatenation(a: bytes, b: bytes) -> None:
    assert checksum(a, b) == checksum(a + b)


def test_ones_sum_negative_zero_rule() -> None:
    assert ones_sum(b"\xff\xff") == 0xFFFF
    assert ones_sum(b"\x00\x00") == 0
    assert ones_sum(b"") == 0


def test_checksum_matches_dpkt_in_cksum() -> None:
    data = bytes(range(256)) * 3 + b"\x01"
    assert checksum(data) == dpkt.dpkt.in_cksum(data)


def test_mac_text_round_trip_and_errors() -> None:
    assert mac_to_str(mac_from_str("9a:55:9A:55:9a:5")) == "9a:55:9a:55:9a:05"
    for bad in ("9a:55:9a:55:9a", "zz:55:9a:55:9a:55", "9a:55:9a:55:9a:555", ""):
        with pytest.raises(ValueError, match="invalid MAC"):
            mac_from_str(bad)
    assert ipv6_multicast_mac(bytes.fromhex("ff020000000000000000000000000001")) == bytes.fromhex(
        "333300000001"
    )


def test_ethernet_round_trip_and_errors() -> None:
    frame = build_ethernet(b"\x01" * 6, b"\x02" * 6, ETH_P_IP, b"xyz")
    eth = parse_ethernet(memoryview(frame))
    assert (eth.dst, eth.src, eth.ethertype, bytes(eth.payload)) == (
        b"\x01" * 6,
        b"\x02" * 6,
        ETH_P_IP,
        b"xyz",
    )
    with pytest.raises(MalformedFrame, match=r"eth\.truncated"):
        parse_ethernet(memoryview(frame[:13]))
    with pytest.raises(MalformedFrame, match=r"eth\.not_ethernet2"):
        parse_ethernet(memoryview(frame[:12] + b"\x00\x40"))


def test_ipv4_header_checked_by_dpkt() -> None:
    packet = build_ipv4_header(A4, B4, 17, 5, ttl=33) + b"hello"
    ip = dpkt.ip.IP(packet)
    assert ip.ttl == 33 and ip.p == 17 and ip.len == 25 and ip.df
    assert checksum(packet[:20]) == 0
    parsed = parse_ipv4(memoryview(packet + b"\0" * 20))  # Ethernet padding past total_len is ignored
    assert (parsed.src, parsed.dst, parsed.proto, bytes(parsed.payload)) == (A4, B4, 17, b"hello")
    assert not parsed.is_fragment


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p[:19], "ipv4.truncated"),
        (lambda p: b"\x65" + p[1:], "ipv4.bad_version"),
        (lambda p: b"\x44" + p[1:], "ipv4.bad_ihl"),
        (lambda p: p[:2] + b"\x00\x10" + p[4:], "ipv4.bad_length"),
        (lambda p: p[:2] + b"\x01\x00" + p[4:], "ipv4.bad_length"),
        (lambda p: b"\x4f" + p[1:], "ipv4.bad_length"),  # 60-byte header in a 25-byte packet
    ],
)
def test_ipv4_malformed(mutate: object, reason: str) -> None:
    packet = build_ipv4_header(A4, B4, 17, 5) + b"hello"
    with pytest.raises(MalformedFrame, match=reason.replace(".", r"\.")):
        parse_ipv4(memoryview(mutate(packet)))  # type: ignore[operator]


def test_ipv4_fragment_flag() -> None:
    packet = bytearray(build_ipv4_header(A4, B4, 17, 0))
    packet[6] = 0x20  # more fragments
    assert parse_ipv4(memoryview(bytes(packet))).is_fragment


def test_ipv6_extension_walk() -> None:
    hop_by_hop = bytes((17, 0)) + b"\x01\x04\x00\x00\x00\x00"  # next=UDP, 8 bytes, PadN
    packet = build_ipv6_header(A6, B6, 0, len(hop_by_hop) + 3) + hop_by_hop + b"abc"
    ip = parse_ipv6(memoryview(packet))
    assert (ip.proto, bytes(ip.payload), ip.fragment) == (17, b"abc", False)
    frag = bytes((17, 0, 0, 1, 0, 0, 0, 7))
    ip = parse_ipv6(memoryview(build_ipv6_header(A6, B6, 44, 8) + frag))
    assert ip.fragment


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (build_ipv6_header(A6, B6, 17, 0)[:39], "ipv6.truncated"),
        (b"\x40" + build_ipv6_header(A6, B6, 17, 0)[1:], "ipv6.bad_version"),
        (build_ipv6_header(A6, B6, 17, 10), "ipv6.bad_length"),
        (build_ipv6_header(A6, B6, 0, 4) + b"\x11\x00\x00\x00", "ipv6.ext_truncated"),
        (build_ipv6_header(A6, B6, 0, 8) + b"\x11\x05" + bytes(6), "ipv6.ext_truncated"),
        (build_ipv6_header(A6, B6, 60, 72) + bytes((60, 0, 0, 0, 0, 0, 0, 0)) * 9, "ipv6.too_many_ext"),
    ],
)
def test_ipv6_malformed(packet: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame, match=reason.replace(".", r"\.")):
        parse_ipv6(memoryview(packet))


def test_udp_builders_checked_by_dpkt() -> None:
    ip = dpkt.ip.IP(build_udp4(A4, B4, 1000, 53, b"query"))
    assert isinstance(ip.data, dpkt.udp.UDP)
    udp_bytes = bytes(ip.data)
    ip.data.sum = 0
    ip.sum = 0
    assert dpkt.ip.IP(bytes(ip)).data.sum == int.from_bytes(udp_bytes[6:8], "big")
    ip6 = dpkt.ip6.IP6(build_udp6(A6, B6, 546, 547, b"x"))
    sent_sum = ip6.data.sum
    ip6.data.sum = 0
    assert dpkt.ip6.IP6(bytes(ip6)).data.sum == sent_sum
    parsed = parse_udp(memoryview(build_udp4(A4, B4, 1000, 53, b"query")[20:]))
    assert (parsed.sport, parsed.dport, bytes(parsed.payload)) == (1000, 53, b"query")
    with pytest.raises(MalformedFrame, match=r"udp\.truncated"):
        parse_udp(memoryview(b"1234567"))
    with pytest.raises(MalformedFrame, match=r"udp\.bad_length"):
        parse_udp(memoryview(b"\x00\x01\x00\x02\x00\x07\x00\x00"))
    with pytest.raises(MalformedFrame, match=r"udp\.bad_length"):
        parse_udp(memoryview(b"\x00\x01\x00\x02\x00\x09\x00\x00"))


def test_icmp_echo_builders_checked_by_dpkt() -> None:
    packet = build_icmp4_packet(A4, B4, build_echo(ICMP_ECHO_REQUEST, 7, 9, b"ping"))
    icmp = dpkt.ip.IP(packet).data
    assert icmp.type == 8 and icmp.data.id == 7 and icmp.data.seq == 9 and icmp.data.data == b"ping"
    assert checksum(packet[20:]) == 0
    packet6 = build_icmp6_packet(A6, B6, build_echo(ICMPV6_ECHO_REPLY, 7, 9, b"pong"))
    ip6 = dpkt.ip6.IP6(packet6)
    sent = ip6.data.sum
    ip6.data.sum = 0
    assert dpkt.ip6.IP6(bytes(ip6)).data.sum == sent
    parsed = parse_icmp(memoryview(packet[20:]))
    assert (parsed.type, parsed.code, parsed.ident, parsed.seq, bytes(parsed.body)) == (8, 0, 7, 9, b"ping")
    with pytest.raises(MalformedFrame, match=r"icmp\.truncated"):
        parse_icmp(memoryview(b"\x08\x00"))


def test_arp_round_trip() -> None:
    payload = build_arp(ARP_REQUEST, b"\x02" * 6, A4, b"\x00" * 6, B4)
    arp = parse_arp(memoryview(payload))
    assert (arp.op, arp.sha, arp.spa, arp.tpa) == (ARP_REQUEST, b"\x02" * 6, A4, B4)
    assert dpkt.arp.ARP(payload).tpa == B4
    with pytest.raises(MalformedFrame, match=r"arp\.truncated"):
        parse_arp(memoryview(payload[:27]))
    with pytest.raises(MalformedFrame, match=r"arp\.unsupported"):
        parse_arp(memoryview(b"\x00\x06" + payload[2:]))


PARSERS = [parse_ethernet, parse_ipv4, parse_ipv6, parse_udp, parse_icmp, parse_arp]


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_malformed(parser: object, data: bytes) -> None:
    try:
        parser(memoryview(data))  # type: ignore[operator]
    except MalformedFrame:
        pass


@pytest.mark.parametrize("size", [65000, 65535, 65536, 262144 + 3])
def test_checksum_of_large_buffers_equals_fold(size: int) -> None:
    """The big-number path folds halves together several times for these sizes."""
    ramp = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for data in (ramp, b"\xff" * size, random.randbytes(size)):
        assert checksum(data) == fold_checksum(data)
