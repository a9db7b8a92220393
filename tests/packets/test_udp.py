"""UDP codec: parse bounds, and the per-flow header template against the plain builders and dpkt."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.packets.checksum import checksum, ones_sum, pseudo_header4, pseudo_header6
from passtd.dataplane.packets.udp import (
    UDP_HLEN,
    build_udp4,
    build_udp6,
    parse_udp,
    udp_headers,
    udp_headers_partial,
    udp_offload_vnet_header,
    udp_template,
)
from passtd.dataplane.packets.vnet import F_NEEDS_CSUM, GSO_NONE, VNET_HDR_LEN
from passtd.errors import MalformedFrame

A4, B4 = bytes((10, 0, 2, 15)), bytes((10, 0, 2, 2))
A6, B6 = bytes.fromhex("fd770000000000000000000000000001"), bytes.fromhex("fe800000000000000000000000000002")

addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)
port = st.integers(0, 65535)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_parse_or_raise_malformed(data: bytes) -> None:
    try:
        udp = parse_udp(memoryview(data))
    except MalformedFrame as exc:
        reason = exc.reason
    else:
        assert UDP_HLEN <= udp.length <= len(data)
        assert len(udp.payload) == udp.length - UDP_HLEN
        return
    assert reason in ("udp.truncated", "udp.bad_length")


@given(st.one_of(st.tuples(addr4, addr4), st.tuples(addr6, addr6)), port, port, st.binary(max_size=600))
def test_template_headers_equal_the_plain_builders(addrs: tuple[bytes, bytes], sport: int, dport: int,
                                                   payload: bytes) -> None:  # fmt: skip
    src, dst = addrs
    build = build_udp6 if len(src) == 16 else build_udp4
    tpl = udp_template(src, dst, sport, dport)
    assert udp_headers(tpl, payload) + payload == build(src, dst, sport, dport, payload)
    assert udp_headers(tpl, memoryview(bytearray(payload))) == udp_headers(tpl, payload)


@pytest.mark.parametrize("payload", [b"", b"\x00", bytes(64), b"\xff" * 7, bytes(range(256)) * 50])
def test_template_checksums_verify_with_dpkt(payload: bytes) -> None:
    ip = dpkt.ip.IP(udp_headers(udp_template(A4, B4, 5001, 40000), payload) + payload)
    assert (ip.src, ip.dst, ip.ttl, ip.df, ip.p) == (A4, B4, 64, 1, 17)
    assert (ip.data.sport, ip.data.dport, ip.data.ulen, ip.data.data) == (
        5001,
        40000,
        8 + len(payload),
        payload,
    )
    assert checksum(bytes(ip)[:20]) == 0  # IPv4 header checksum verifies
    segment = bytes(ip)[20:]
    assert ip.data.sum != 0 and checksum(pseudo_header4(A4, B4, 17, len(segment)), segment) == 0
    ip6 = dpkt.ip6.IP6(udp_headers(udp_template(A6, B6, 53, 33333), payload) + payload)
    assert (ip6.src, ip6.dst, ip6.hlim, ip6.nxt, ip6.plen) == (A6, B6, 255, 17, 8 + len(payload))
    segment = bytes(ip6)[40:]
    assert checksum(pseudo_header6(A6, B6, 17, len(segment)), segment) == 0


def test_zero_checksum_goes_out_as_ffff() -> None:
    """RFC 768: a computed checksum of 0 is transmitted as all ones. Pick a payload word that makes it 0."""
    tpl = udp_template(A4, B4, 1, 2)
    base = udp_headers(tpl, bytes(2))
    csum = struct.unpack_from("!H", base, 26)[0]  # checksum with payload 0x0000: pick the word that zeroes it
    payload = csum.to_bytes(2, "big") if csum != 0xFFFF else b"\x00\x00"
    hdr = udp_headers(tpl, payload)
    assert struct.unpack_from("!H", hdr, 26)[0] == 0xFFFF
    assert hdr + payload == build_udp4(A4, B4, 1, 2, payload)


@pytest.mark.parametrize(("src", "dst", "ip_hlen"), [(A4, B4, 20), (A6, B6, 40)])
@pytest.mark.parametrize("payload", [b"", b"abc", bytes(range(200))])
def test_partial_headers_hold_the_pseudo_header_sum(
    src: bytes, dst: bytes, ip_hlen: int, payload: bytes
) -> None:
    """What the kernel does with NEEDS_CSUM (sum from csum_start, complement, store at csum_offset) must give
    the same bytes as a full checksum computed here."""
    tpl = udp_template(src, dst, 7, 8)
    partial = bytearray(udp_headers_partial(tpl, len(payload)) + payload)
    full = udp_headers(tpl, payload) + payload
    assert partial[:ip_hlen] == full[:ip_hlen]  # the IP header is complete either way
    pseudo = (pseudo_header6 if ip_hlen == 40 else pseudo_header4)(src, dst, 17, 8 + len(payload))
    assert struct.unpack_from("!H", partial, ip_hlen + 6)[0] == ones_sum(pseudo)
    flags, gso, hdr_len, gso_size, start, offset = struct.unpack(
        "<BBHHHH", udp_offload_vnet_header(ip_hlen == 40)
    )
    assert (flags, gso, gso_size, offset) == (F_NEEDS_CSUM, GSO_NONE, 0, 6)
    assert (start, hdr_len) == (14 + ip_hlen, 14 + ip_hlen + 8)
    assert len(udp_offload_vnet_header(False)) == VNET_HDR_LEN
    frame_l4 = partial[ip_hlen:]
    done = ~ones_sum(frame_l4) & 0xFFFF or 0xFFFF  # the kernel's skb_checksum_help, UDP zero mangled
    struct.pack_into("!H", partial, ip_hlen + 6, done)
    assert bytes(partial) == full
