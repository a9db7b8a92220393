"""NDP codec: RS/NS parsing with exact error reasons; RA/NA/option builders checked bytewise and by dpkt."""

from __future__ import annotations

import struct
from ipaddress import IPv6Address

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.packets.icmp import build_icmp6_packet
from passtd.dataplane.packets.ndp import (
    INFINITE_LIFETIME,
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    ND_OPT_DNSSL,
    ND_OPT_MTU,
    ND_OPT_PREFIX_INFO,
    ND_OPT_RDNSS,
    ND_OPT_SOURCE_LLADDR,
    ND_OPT_TARGET_LLADDR,
    ND_ROUTER_ADVERT,
    ND_ROUTER_SOLICIT,
    RA_FLAG_MANAGED,
    RA_FLAG_OTHER,
    NdpOption,
    RouterSolicitation,
    build_neighbor_advertisement,
    build_option_dnssl,
    build_option_lladdr,
    build_option_mtu,
    build_option_prefix_info,
    build_option_rdnss,
    build_router_advertisement,
    parse_neighbor_solicitation,
    parse_options,
    parse_router_solicitation,
)
from passtd.errors import MalformedFrame

MAC = bytes.fromhex("020000000001")
TARGET = IPv6Address("fd00::1").packed
SRC = IPv6Address("fe80::1").packed
DST = IPv6Address("fe80::2").packed


def rs(options: bytes = b"", code: int = 0) -> memoryview:
    return memoryview(struct.pack("!BBHI", ND_ROUTER_SOLICIT, code, 0, 0) + options)


def ns(target: bytes = TARGET, options: bytes = b"", code: int = 0) -> memoryview:
    return memoryview(struct.pack("!BBHI16s", ND_NEIGHBOR_SOLICIT, code, 0, 0, target) + options)


def sllao(mac: bytes = MAC) -> bytes:
    return bytes((1, 1)) + mac


def cksum_ok(src: bytes, dst: bytes, message: bytes) -> bool:
    pseudo = src + dst + struct.pack("!I", len(message)) + b"\x00\x00\x00\x3a"
    return bool(dpkt.in_cksum(pseudo + message) == 0)


# -- parsing ----------------------------------------------------------------------------------------------


def test_parse_rs_without_options() -> None:
    msg = parse_router_solicitation(rs())
    assert msg.options == ()
    assert msg.source_lladdr is None


def test_parse_rs_with_source_lladdr_and_unknown_option() -> None:
    unknown = bytes((200, 2)) + bytes(14)
    msg = parse_router_solicitation(rs(unknown + sllao()))
    assert msg.options == (NdpOption(200, bytes(14)), NdpOption(ND_OPT_SOURCE_LLADDR, MAC))
    assert msg.source_lladdr == MAC


def test_parse_ns_target_and_options() -> None:
    msg = parse_neighbor_solicitation(ns(options=sllao()))
    assert msg.target == TARGET
    assert msg.source_lladdr == MAC


def test_lladdr_is_first_six_bytes_of_a_longer_option() -> None:
    """Link types with longer addresses use more units; for Ethernet only the first six bytes count."""
    msg = parse_neighbor_solicitation(ns(options=bytes((1, 2)) + MAC + bytes(8)))
    assert msg.source_lladdr == MAC
    assert RouterSolicitation((NdpOption(ND_OPT_SOURCE_LLADDR, b"\x01\x02"),)).source_lladdr is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "ndp.truncated"),
        (bytes((133, 0, 0, 0, 0, 0, 0)), "ndp.truncated"),
        (bytes(rs(code=1)), "ndp.bad_code"),
        (bytes(ns())[:8], "ndp.bad_type"),
        (bytes(rs(bytes((1, 0)) + bytes(6))), "ndp.bad_option_len"),
        (bytes(rs(bytes((1, 2)) + bytes(6))), "ndp.option_past_end"),
        (bytes(rs(sllao() + b"\x01")), "ndp.option_past_end"),
    ],
)
def test_rs_errors(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame) as exc:
        parse_router_solicitation(memoryview(data))
    assert exc.value.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (bytes(ns())[:23], "ndp.truncated"),
        (bytes(rs()) + bytes(16), "ndp.bad_type"),
        (bytes(ns(code=3)), "ndp.bad_code"),
        (bytes(ns(target=IPv6Address("ff02::1").packed)), "ndp.multicast_target"),
        (bytes(ns(options=sllao() + bytes((1, 0)) + bytes(6))), "ndp.bad_option_len"),
        (bytes(ns(options=bytes((25, 3)) + bytes(14))), "ndp.option_past_end"),
    ],
)
def test_ns_errors(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame) as exc:
        parse_neighbor_solicitation(memoryview(data))
    assert exc.value.reason == reason


def test_zero_length_option_after_valid_one_does_not_loop() -> None:
    with pytest.raises(MalformedFrame, match=r"ndp\.bad_option_len"):
        parse_options(memoryview(sllao() + bytes(8)))


@given(st.binary(max_size=200))
def test_fuzz_parsers_return_or_raise_malformed(data: bytes) -> None:
    for parse in (parse_router_solicitation, parse_neighbor_solicitation, parse_options):
        try:
            parse(memoryview(data))
        except MalformedFrame:
            pass


@given(st.lists(st.tuples(st.integers(0, 255), st.integers(1, 4)), max_size=6), st.data())
def test_fuzz_options_roundtrip(specs: list[tuple[int, int]], data: st.DataObject) -> None:
    wire = b""
    expected = []
    for typ, units in specs:
        body = data.draw(st.binary(min_size=units * 8 - 2, max_size=units * 8 - 2))
        wire += bytes((typ, units)) + body
        expected.append(NdpOption(typ, body))
    assert parse_options(memoryview(wire)) == tuple(expected)
    assert parse_router_solicitation(rs(wire)).options == tuple(expected)


# -- builders ---------------------------------------------------------------------------------------------


def test_lladdr_options() -> None:
    assert build_option_lladdr(ND_OPT_SOURCE_LLADDR, MAC) == b"\x01\x01" + MAC
    assert build_option_lladdr(ND_OPT_TARGET_LLADDR, MAC) == b"\x02\x01" + MAC


def test_prefix_info_golden() -> None:
    opt = build_option_prefix_info(IPv6Address("2001:db8:1::"), 64, on_link=True, autonomous=True)
    assert opt.hex() == "030440c0ffffffffffffffff0000000020010db8000100000000000000000000"
    opt = build_option_prefix_info(
        IPv6Address("fd00::"), 48, on_link=True, autonomous=False, valid_lifetime=7, preferred_lifetime=3
    )
    assert opt[:4] == bytes((3, 4, 48, 0x80))
    assert struct.unpack("!II", opt[4:12]) == (7, 3)
    assert len(opt) == 32


def test_mtu_option() -> None:
    assert build_option_mtu(1500) == bytes((5, 1, 0, 0)) + (1500).to_bytes(4, "big")
    assert build_option_mtu(65520)[0] == ND_OPT_MTU


def test_rdnss_option() -> None:
    servers = [IPv6Address("2001:db8::53"), IPv6Address("fd00::35")]
    opt = build_option_rdnss(servers, 180)
    assert opt[:2] == bytes((ND_OPT_RDNSS, 5))
    assert struct.unpack("!HI", opt[2:8]) == (0, 180)
    assert opt[8:24] == servers[0].packed
    assert opt[24:40] == servers[1].packed
    assert len(opt) == 5 * 8


def test_dnssl_option_encoding_and_padding() -> None:
    opt = build_option_dnssl(["example.com", "a.b."], 60)
    names = b"\x07example\x03com\x00" + b"\x01a\x01b\x00"
    assert opt[0] == ND_OPT_DNSSL
    assert opt[1] * 8 == len(opt)
    assert len(opt) % 8 == 0
    assert struct.unpack("!HI", opt[2:8]) == (0, 60)
    assert opt[8:].rstrip(b"\x00") + b"\x00" == names
    assert opt[8 : 8 + len(names)] == names
    assert set(opt[8 + len(names) :]) <= {0}


def test_dnssl_skips_bad_names_and_may_be_empty() -> None:
    opt = build_option_dnssl(["bad..name", "x" * 64 + ".com", "ok.org"], 60)
    assert opt[8:16] == b"\x02ok\x03org\x00"
    assert build_option_dnssl(["", "a" * 70], 60) == b""


def test_dnssl_stays_within_option_size() -> None:
    long_names = [f"{'x' * 60}.{i:03d}.example" for i in range(100)]
    opt = build_option_dnssl(long_names, 60)
    assert len(opt) <= 255 * 8
    assert opt[1] * 8 == len(opt)


def test_router_advertisement_layout_and_checksum() -> None:
    options = [build_option_mtu(1500), build_option_lladdr(ND_OPT_SOURCE_LLADDR, MAC)]
    msg = build_router_advertisement(
        cur_hop_limit=64,
        flags=RA_FLAG_MANAGED | RA_FLAG_OTHER,
        router_lifetime=9000,
        reachable_time=1,
        retrans_timer=2,
        options=options,
    )
    assert struct.unpack("!BBHBBHII", msg[:16]) == (ND_ROUTER_ADVERT, 0, 0, 64, 0xC0, 9000, 1, 2)
    assert bytes(msg[16:]) == b"".join(options)
    packet = build_icmp6_packet(SRC, DST, msg)
    ip = dpkt.ip6.IP6(packet)
    assert ip.hlim == 255
    assert ip.nxt == 58
    icmp = bytes(ip.data)
    assert icmp[0] == ND_ROUTER_ADVERT
    assert cksum_ok(SRC, DST, icmp)


@pytest.mark.parametrize(
    ("router", "solicited", "override", "flags"),
    [(True, True, True, 0xE0000000), (True, False, True, 0xA0000000), (False, True, False, 0x40000000)],
)
def test_neighbor_advertisement_flags(router: bool, solicited: bool, override: bool, flags: int) -> None:
    tllao = build_option_lladdr(ND_OPT_TARGET_LLADDR, MAC)
    msg = build_neighbor_advertisement(
        TARGET, router=router, solicited=solicited, override=override, options=[tllao]
    )
    assert struct.unpack("!BBHI16s", msg[:24]) == (ND_NEIGHBOR_ADVERT, 0, 0, flags, TARGET)
    assert bytes(msg[24:]) == tllao
    packet = build_icmp6_packet(SRC, DST, msg)
    assert cksum_ok(SRC, DST, packet[40:])
    assert dpkt.icmp6.ICMP6(packet[40:]).type == ND_NEIGHBOR_ADVERT


def test_infinite_lifetime_value() -> None:
    assert INFINITE_LIFETIME == 0xFFFFFFFF
    assert build_option_prefix_info(IPv6Address("::"), 0, on_link=False, autonomous=False)[:4] == bytes(
        (ND_OPT_PREFIX_INFO, 4, 0, 0)
    )
