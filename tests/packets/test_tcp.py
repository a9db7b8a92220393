"""TCP header codec: options that would loop or overrun, and builders checked by dpkt."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.packets.checksum import IPPROTO_TCP, checksum, ones_sum, pseudo_header4, pseudo_header6
from passtd.dataplane.packets.ipv4 import build_ipv4_header
from passtd.dataplane.packets.ipv6 import build_ipv6_header
from passtd.dataplane.packets.tcp import ACK, SYN, SegmentBuilder, parse_tcp, syn_options, tcp_checksum_ok
from passtd.errors import MalformedFrame

A4, B4 = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))
A6, B6 = bytes(15) + b"\x01", bytes(15) + b"\x02"


def header(flags: int, options: bytes = b"", payload: bytes = b"") -> bytes:
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", 1, 2, 3, 4, doff << 4, flags, 5, 0, 0) + options + payload


def test_syn_options_parsed() -> None:
    tcp = parse_tcp(memoryview(header(SYN, syn_options(1400, 7))))
    assert (tcp.mss, tcp.ws, tcp.flags, tcp.window) == (1400, 7, SYN, 5)
    tcp = parse_tcp(memoryview(header(SYN, b"\x01\x01\x04\x02" + b"\x03\x03\x20\x00")))  # SACK-perm, WS 32
    assert (tcp.mss, tcp.ws) == (0, 14)  # clamped to RFC 7323's 14
    tcp = parse_tcp(memoryview(header(SYN, b"\x00\x00\x00\x00")))  # EOL first
    assert (tcp.mss, tcp.ws) == (0, -1)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (b"\x02\x00\x00\x00", "tcp.bad_option_length"),  # length 0: the reference C loops here
        (b"\x02\x01\x00\x00", "tcp.bad_option_length"),
        (b"\x01\x01\x01\x02", "tcp.option_truncated"),  # kind in the last byte, no length
        (b"\x02\x08\x05\xb4", "tcp.bad_option_length"),  # runs past the header
    ],
)
def test_bad_options(options: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame, match=reason.replace(".", r"\.")):
        parse_tcp(memoryview(header(SYN, options)))


def test_bad_lengths() -> None:
    with pytest.raises(MalformedFrame, match=r"tcp\.truncated"):
        parse_tcp(memoryview(header(ACK)[:19]))
    bad = bytearray(header(ACK))
    bad[12] = 4 << 4
    with pytest.raises(MalformedFrame, match=r"tcp\.bad_data_offset"):
        parse_tcp(memoryview(bytes(bad)))
    bad[12] = 6 << 4
    with pytest.raises(MalformedFrame, match=r"tcp\.bad_data_offset"):
        parse_tcp(memoryview(bytes(bad)))


@given(st.binary(max_size=120), st.integers(0, 255))
def test_arbitrary_bytes(data: bytes, flags: int) -> None:
    try:
        parse_tcp(memoryview(data))
        options = data[: min(len(data), 40) // 4 * 4]  # 40 bytes: the most a TCP header holds
        parse_tcp(memoryview(header(flags | SYN, options)))
    except MalformedFrame:
        pass


@pytest.mark.parametrize(("src", "dst"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
@pytest.mark.parametrize("size", [0, 1, 1459, 65000])
def test_segment_builder_checked_by_dpkt(src: bytes, dst: bytes, size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    packet = SegmentBuilder(src, dst, 80, 40000).build(7, 9, ACK, 100, data, syn_options(1460, 8))
    ip = dpkt.ip6.IP6(packet) if len(src) == 16 else dpkt.ip.IP(packet)
    tcp = ip.data
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.win, tcp.data) == (80, 40000, 7, 9, 100, data)
    hlen = 40 if len(src) == 16 else 20
    assert tcp_checksum_ok(src, dst, memoryview(packet)[hlen:])
    sent = tcp.sum
    tcp.sum = 0
    if len(src) == 4:
        ip.sum = 0  # dpkt recomputes transport checksums only with a zero IPv4 checksum
    again = dpkt.ip6.IP6(bytes(ip)) if len(src) == 16 else dpkt.ip.IP(bytes(ip))
    assert again.data.sum == sent


def _plain_segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
                   window: int, payload: bytes, options: bytes, offload: bool) -> bytes:  # fmt: skip
    """The textbook construction: TCP header with options, checksum over pseudo-header + segment (or, with
    offload, only the folded pseudo-header sum the kernel completes), then a separately built IP header."""
    hlen = 20 + len(options)
    seg_len = hlen + len(payload)
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (hlen // 4) << 4, flags, window, 0, 0))
    tcp += options
    pseudo = pseudo_header6 if len(src) == 16 else pseudo_header4
    ph = pseudo(src, dst, IPPROTO_TCP, seg_len)
    csum = ones_sum(ph) if offload else checksum(ph, tcp, payload)
    struct.pack_into("!H", tcp, 16, csum)
    if len(src) == 16:
        ip = build_ipv6_header(src, dst, IPPROTO_TCP, seg_len, hop_limit=64)
    else:
        ip = build_ipv4_header(src, dst, IPPROTO_TCP, seg_len)
    return ip + bytes(tcp) + payload


@given(
    st.sampled_from([(A4, B4), (A6, B6), (bytes((255,) * 4), bytes(4)), (bytes((255,) * 16), bytes(16))]),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=300),
    st.booleans(),
    st.sampled_from([b"", syn_options(1460, -1), syn_options(65495, 7), syn_options(0, 0)]),
)
def test_fast_headers_equal_the_plain_construction(
    addrs: tuple[bytes, bytes], seq: int, ack: int, flags: int, window: int, data: bytes, offload: bool,
    options: bytes,
) -> None:  # fmt: skip
    """The one-pack path with summed-once constants builds exactly what the textbook construction does,
    options (SYN, SYN-ACK) included."""
    src, dst = addrs
    seg = SegmentBuilder(src, dst, 65535, 1, offload)
    plain = _plain_segment(src, dst, 65535, 1, seq, ack, flags, window, data, options, offload)
    assert seg.headers(seq, ack, flags, window, data, options) + data == plain
    if not offload:
        hlen = 40 if len(src) == 16 else 20
        assert tcp_checksum_ok(src, dst, memoryview(seg.build(seq, ack, flags, window, data))[hlen:])
