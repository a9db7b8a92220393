"""TCP header codec: options that would loop or overrun, and builders checked by dpkt."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@given(
    st.sampled_from([(A4, B4), (A6, B6), (bytes((255,) * 4), bytes(4)), (bytes((255,) * 16), bytes(16))]),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=300),
    st.booleans(),
)
def test_fast_headers_equal_the_plain_construction(
    addrs: tuple[bytes, bytes], seq: int, ack: int, flags: int, window: int, data: bytes, offload: bool
) -> None:
    """The one-pack path with summed-once constants builds exactly what the plain construction does."""
    src, dst = addrs
    seg = SegmentBuilder(src, dst, 65535, 1, offload)
    assert seg.headers(seq, ack, flags, window, data) == seg._with_options(seq, ack, flags, window, data, b"")
    if not offload:
        hlen = 40 if len(src) == 16 else 20
        assert tcp_checksum_ok(src, dst, memoryview(seg.build(seq, ack, flags, window, data))[hlen:])
