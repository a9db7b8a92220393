"""DHCPv6 codec: message/option parsing with exact error reasons, golden builders, fuzzing."""

from __future__ import annotations

import struct
from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.packets.dhcpv6 import (
    INFINITY,
    MSG_ADVERTISE,
    MSG_RELAY_FORW,
    MSG_SOLICIT,
    OPT_CLIENTID,
    OPT_DNS_SERVERS,
    OPT_DOMAIN_LIST,
    OPT_ELAPSED_TIME,
    OPT_IA_NA,
    OPT_IA_PD,
    OPT_IA_TA,
    OPT_IAADDR,
    OPT_STATUS_CODE,
    STATUS_NOT_ON_LINK,
    Dhcpv6Option,
    build_dhcpv6,
    build_dns_servers,
    build_domain_list,
    build_duid_ll,
    build_ia,
    build_ia_address,
    build_option,
    build_status_code,
    parse_dhcpv6,
    parse_ia,
    parse_ia_address,
    parse_options,
    parse_status_code,
)
from passtd.errors import MalformedFrame

MAC = bytes.fromhex("9a559a559a55")
ADDR = IPv6Address("2001:db8::10")


def opt(code: int, data: bytes) -> bytes:
    """Independent encoder for test inputs (RFC 8415 §21.1)."""
    return struct.pack("!HH", code, len(data)) + data


def test_parse_solicit_like_dhclient() -> None:
    duid = bytes.fromhex("000100012c3b4a5d525400123456")
    ia_na = struct.pack("!III", 0x12345678, 0, 0)
    raw = (
        bytes((MSG_SOLICIT, 0xAB, 0xCD, 0xEF)) + opt(OPT_CLIENTID, duid) + opt(OPT_ELAPSED_TIME, b"\x00\x00")
    )
    raw += opt(OPT_IA_NA, ia_na)
    msg = parse_dhcpv6(memoryview(raw))
    assert msg.msg_type == MSG_SOLICIT
    assert msg.xid == 0xABCDEF
    assert msg.get(OPT_CLIENTID) == duid
    assert msg.get(OPT_ELAPSED_TIME) == b"\x00\x00"
    assert msg.get(OPT_DNS_SERVERS) is None
    assert msg.get_all(OPT_IA_NA) == (ia_na,)
    ia = parse_ia(OPT_IA_NA, ia_na)
    assert (ia.iaid, ia.t1, ia.t2, ia.options) == (0x12345678, 0, 0, ())


def test_zero_length_options_are_legal_and_advance() -> None:
    raw = bytes((1, 0, 0, 1)) + opt(14, b"") + opt(14, b"") + opt(OPT_CLIENTID, b"\x00\x03")
    msg = parse_dhcpv6(memoryview(raw))
    assert msg.options == (
        Dhcpv6Option(14, b""),
        Dhcpv6Option(14, b""),
        Dhcpv6Option(OPT_CLIENTID, b"\x00\x03"),
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "dhcpv6.truncated"),
        (b"\x01\x00\x00", "dhcpv6.truncated"),
        (b"\x01\x00\x00\x01\x00\x01\x00", "dhcpv6.option_truncated"),
        (b"\x01\x00\x00\x01" + struct.pack("!HH", 1, 5) + b"\x00\x01", "dhcpv6.bad_option_len"),
        (bytes((MSG_RELAY_FORW, 0)) + bytes(40), "dhcpv6.relay_message"),
    ],
)
def test_message_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame) as exc:
        parse_dhcpv6(memoryview(raw))
    assert exc.value.reason == reason


@pytest.mark.parametrize(
    ("code", "data", "reason"),
    [
        (OPT_IA_NA, bytes(11), "dhcpv6.ia_truncated"),
        (OPT_IA_PD, bytes(4), "dhcpv6.ia_truncated"),
        (OPT_IA_TA, bytes(3), "dhcpv6.ia_truncated"),
        (OPT_IA_NA, bytes(12) + b"\x00\x05\x00", "dhcpv6.ia.option_truncated"),
        (OPT_IA_NA, bytes(12) + struct.pack("!HH", 5, 24) + bytes(23), "dhcpv6.ia.bad_option_len"),
    ],
)
def test_ia_errors(code: int, data: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame) as exc:
        parse_ia(code, data)
    assert exc.value.reason == reason


def test_ia_address_and_status_errors() -> None:
    with pytest.raises(MalformedFrame, match=r"dhcpv6\.iaaddr_truncated"):
        parse_ia_address(bytes(23))
    with pytest.raises(MalformedFrame, match=r"dhcpv6\.iaaddr\.bad_option_len"):
        parse_ia_address(bytes(24) + struct.pack("!HH", 13, 3))
    with pytest.raises(MalformedFrame, match=r"dhcpv6\.status_truncated"):
        parse_status_code(b"\x00")


def test_parse_ia_ta() -> None:
    ia = parse_ia(OPT_IA_TA, b"\x00\x00\x00\x07" + opt(OPT_IAADDR, ADDR.packed + bytes(8)))
    assert ia.iaid == 7
    assert (ia.t1, ia.t2) == (0, 0)
    assert parse_ia_address(ia.options[0].data).addr == ADDR


def test_duid_ll_golden() -> None:
    assert build_duid_ll(MAC).hex() == "00030001" + MAC.hex()


def test_ia_na_with_address_golden() -> None:
    ia = build_ia(OPT_IA_NA, 0x0A0B0C0D, INFINITY, INFINITY, [build_ia_address(ADDR, INFINITY, INFINITY)])
    expected = (
        "0003" "0028" "0a0b0c0d" "ffffffff" "ffffffff"
        "0005" "0018" "20010db8000000000000000000000010" "ffffffff" "ffffffff"
    )  # fmt: skip
    assert ia.hex() == expected
    parsed = parse_options(ia)
    assert parsed[0].code == OPT_IA_NA
    inner = parse_ia(OPT_IA_NA, parsed[0].data)
    assert inner.iaid == 0x0A0B0C0D
    addr = parse_ia_address(inner.options[0].data)
    assert (addr.addr, addr.preferred, addr.valid, addr.options) == (ADDR, INFINITY, INFINITY, ())


def test_ia_ta_has_no_timers_on_the_wire() -> None:
    assert build_ia(OPT_IA_TA, 5, 1, 2) == opt(OPT_IA_TA, b"\x00\x00\x00\x05")


def test_status_code_roundtrip() -> None:
    raw = build_status_code(STATUS_NOT_ON_LINK, "not here")
    assert raw == opt(OPT_STATUS_CODE, b"\x00\x04not here")
    assert parse_status_code(raw[4:]) == (STATUS_NOT_ON_LINK, "not here")


def test_dns_servers_and_domain_list() -> None:
    servers = [IPv6Address("2001:db8::53"), IPv6Address("fd00::1")]
    assert build_dns_servers(servers) == opt(OPT_DNS_SERVERS, servers[0].packed + servers[1].packed)
    assert build_domain_list(["example.com", "lan"]) == opt(
        OPT_DOMAIN_LIST, b"\x07example\x03com\x00\x03lan\x00"
    )
    assert build_domain_list(["bad..name", "ok"]) == opt(OPT_DOMAIN_LIST, b"\x02ok\x00")
    assert build_domain_list(["..", ""]) == b""


def test_domain_list_stays_within_option_size() -> None:
    names = [f"{'x' * 60}.{i:04d}.example" for i in range(2000)]
    raw = build_domain_list(names)
    length = struct.unpack("!H", raw[2:4])[0]
    assert length == len(raw) - 4
    assert 0xFFFF - 80 < length <= 0xFFFF


def test_build_message_roundtrip() -> None:
    raw = build_dhcpv6(
        MSG_ADVERTISE, 0x1FFFFFF, [build_option(OPT_CLIENTID, b"\x00\x03ab"), build_option(14, b"")]
    )
    assert raw[:4] == bytes((MSG_ADVERTISE, 0xFF, 0xFF, 0xFF))
    msg = parse_dhcpv6(memoryview(raw))
    assert (msg.msg_type, msg.xid) == (MSG_ADVERTISE, 0xFFFFFF)
    assert msg.options == (Dhcpv6Option(OPT_CLIENTID, b"\x00\x03ab"), Dhcpv6Option(14, b""))


@given(st.binary(max_size=300))
def test_fuzz_parse_returns_or_raises_malformed(data: bytes) -> None:
    try:
        msg = parse_dhcpv6(memoryview(data))
    except MalformedFrame:
        return
    for o in msg.options:
        try:
            if o.code in (OPT_IA_NA, OPT_IA_TA, OPT_IA_PD):
                parse_ia(o.code, o.data)
            elif o.code == OPT_IAADDR:
                parse_ia_address(o.data)
            elif o.code == OPT_STATUS_CODE:
                parse_status_code(o.data)
        except MalformedFrame:
            pass


@given(
    st.integers(0, 11),
    st.integers(0, 0xFFFFFF),
    st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=8),
)
def test_fuzz_build_parse_roundtrip(msg_type: int, xid: int, options: list[tuple[int, bytes]]) -> None:
    raw = build_dhcpv6(msg_type, xid, [build_option(c, d) for c, d in options])
    msg = parse_dhcpv6(memoryview(raw))
    assert (msg.msg_type, msg.xid) == (msg_type, xid)
    assert msg.options == tuple(Dhcpv6Option(c, d) for c, d in options)
