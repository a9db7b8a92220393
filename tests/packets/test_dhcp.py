"""DHCP codec: real client messages, dpkt as oracle, exact failure reasons, and fuzzing."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.packets.dhcp import (
    BOOTP_MIN_LEN,
    BOOTREQUEST,
    DHCP_OPTIONS_OFFSET,
    DHCPDISCOVER,
    FQDN_FLAG_E,
    FQDN_FLAG_S,
    OPT_CLIENT_FQDN,
    OPT_CLIENT_ID,
    OPT_DNS,
    OPT_DOMAIN_SEARCH,
    OPT_HOSTNAME,
    OPT_MAX_MESSAGE_SIZE,
    OPT_MESSAGE_TYPE,
    OPT_PARAM_REQUEST,
    OPT_REQUESTED_IP,
    OPTIONS,
    ClientFqdn,
    DhcpMessage,
    build_dhcp,
    build_options,
    decode_option,
    encode_dns_name,
    encode_option,
    pack_domain_search,
    parse_dhcp,
    unpack_domain_search,
)
from passtd.errors import MalformedFrame

MAC = bytes.fromhex("525400123456")

# Captured from ISC dhclient 4.4.3-P1 (`dhclient -1 v0`, hostname "vm") on a veth in a test namespace.
DHCLIENT_DISCOVER = bytes.fromhex(
    "010106006c67ac6c0000000000000000000000000000000000000000525400123456"
    + "00" * 202
    + "638253633501010c02766d370d011c02030f06770c2c2f1a792aff"
    + "00" * 37
)
# Captured from busybox 1.35.0 `udhcpc -i v0 -n -q` on the same veth.
UDHCPC_DISCOVER = bytes.fromhex(
    "010106003440ef29000000000000000000000000000000000000000052540012345600"
    + "00" * 201
    + "638253633501013902024037070103060c0f1c2a3c0c756468637020312e33352e30"
    + "3d0701525400123456ff"
    + "00" * 20
)


def _header(cookie: int = 0x63825363, hlen: int = 6) -> bytes:
    return struct.pack("!BBBBIHH16s16s64s128sI", 1, 1, hlen, 0, 0x1234, 0, 0, b"", MAC, b"", b"", cookie)


def test_golden_fixtures_are_what_dpkt_sees() -> None:
    for raw in (DHCLIENT_DISCOVER, UDHCPC_DISCOVER):
        assert len(raw) == 300
        oracle = dpkt.dhcp.DHCP(raw)
        msg = parse_dhcp(memoryview(raw))
        assert msg.op == oracle.op == BOOTREQUEST
        assert (msg.htype, msg.hlen, msg.hops) == (oracle.hrd, oracle.hln, oracle.hops)
        assert (msg.xid, msg.secs, msg.flags) == (oracle.xid, oracle.secs, oracle.flags)
        assert msg.hw_addr == oracle.chaddr == MAC
        assert msg.message_type == DHCPDISCOVER
        assert list(msg.options.items()) == [(t, bytes(v)) for t, v in oracle.opts]


def test_golden_round_trip_is_byte_exact() -> None:
    for raw in (DHCLIENT_DISCOVER, UDHCPC_DISCOVER):
        assert build_dhcp(parse_dhcp(memoryview(raw))) == raw


def test_dhclient_discover_fields() -> None:
    msg = parse_dhcp(memoryview(DHCLIENT_DISCOVER))
    assert msg.xid == 0x6C67AC6C
    assert msg.ciaddr == msg.yiaddr == msg.siaddr == msg.giaddr == bytes(4)
    assert msg.chaddr == MAC + bytes(10)
    assert decode_option(OPT_HOSTNAME, msg.options[OPT_HOSTNAME]) == "vm"
    assert list(msg.options[OPT_PARAM_REQUEST]) == [1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42]


def test_udhcpc_discover_fields() -> None:
    msg = parse_dhcp(memoryview(UDHCPC_DISCOVER))
    assert decode_option(OPT_MAX_MESSAGE_SIZE, msg.options[OPT_MAX_MESSAGE_SIZE]) == 576
    assert msg.options[OPT_CLIENT_ID] == b"\x01" + MAC
    assert msg.options[60] == b"udhcp 1.35.0"


def test_dpkt_built_discover_parses() -> None:
    """A dhclient-like DISCOVER built by dpkt (with a requested address) parses into the same fields."""
    oracle = dpkt.dhcp.DHCP(
        xid=0xCAFEF00D,
        secs=3,
        flags=0x8000,
        chaddr=MAC,
        opts=[
            (OPT_MESSAGE_TYPE, b"\x01"),
            (OPT_REQUESTED_IP, IPv4Address("192.0.2.10").packed),
            (OPT_HOSTNAME, b"guest"),
            (OPT_PARAM_REQUEST, bytes([1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42])),
        ],
    )
    raw = bytes(oracle)
    msg = parse_dhcp(memoryview(raw))
    assert (msg.xid, msg.secs, msg.flags, msg.hw_addr) == (0xCAFEF00D, 3, 0x8000, MAC)
    assert decode_option(OPT_REQUESTED_IP, msg.options[OPT_REQUESTED_IP]) == IPv4Address("192.0.2.10")
    assert list(msg.options) == [OPT_MESSAGE_TYPE, OPT_REQUESTED_IP, OPT_HOSTNAME, OPT_PARAM_REQUEST]
    rebuilt = build_dhcp(msg)
    assert len(rebuilt) == BOOTP_MIN_LEN
    assert rebuilt.startswith(raw)  # dpkt does not pad; we pad with PAD after END
    assert rebuilt[len(raw) :] == bytes(BOOTP_MIN_LEN - len(raw))


def test_build_is_read_by_dpkt() -> None:
    msg = DhcpMessage(
        op=2,
        xid=7,
        chaddr=MAC,
        yiaddr=IPv4Address("192.0.2.10").packed,
        options={OPT_MESSAGE_TYPE: b"\x02", OPT_DNS: IPv4Address("192.0.2.53").packed},
    )
    raw = build_dhcp(msg)
    oracle = dpkt.dhcp.DHCP(raw)
    assert (oracle.op, oracle.xid, oracle.yiaddr, oracle.chaddr) == (2, 7, 0xC000020A, MAC)
    assert oracle.opts == [(53, b"\x02"), (6, b"\xc0\x00\x025")]
    assert oracle.data == bytes(len(oracle.data))  # only PAD after END


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "dhcp.truncated"),
        (DHCLIENT_DISCOVER[: DHCP_OPTIONS_OFFSET - 1], "dhcp.truncated"),
        (_header(cookie=0x63825364), "dhcp.bad_cookie"),
        (_header(hlen=17), "dhcp.bad_hlen"),
        (_header() + b"\x35", "dhcp.bad_option_len"),  # code without a length byte
        (_header() + b"\x35\x02\x01", "dhcp.bad_option_len"),  # data runs past the end
        (_header() + b"\x00\x00\x0c\x05ab", "dhcp.bad_option_len"),
        (DHCLIENT_DISCOVER[:252], "dhcp.bad_option_len"),  # cut inside the parameter request list
    ],
)
def test_malformed(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame) as exc:
        parse_dhcp(memoryview(raw))
    assert exc.value.reason == reason


def test_pad_end_and_trailing_bytes() -> None:
    raw = _header() + b"\x00\x00\x35\x01\x03\x00\xff\x35\x07garbage"
    msg = parse_dhcp(memoryview(raw))
    assert msg.options == {OPT_MESSAGE_TYPE: b"\x03"}
    assert msg.message_type == 3


def test_missing_end_is_tolerated() -> None:
    msg = parse_dhcp(memoryview(_header() + b"\x35\x01\x01\x0c\x00"))
    assert msg.options == {OPT_MESSAGE_TYPE: b"\x01", OPT_HOSTNAME: b""}
    assert parse_dhcp(memoryview(_header())).options == {}


def test_repeated_options_are_concatenated() -> None:
    """RFC 3396: several instances of one option form one value, in order; first-seen order is kept."""
    raw = _header() + b"\x77\x02ab\x35\x01\x01\x77\x01c\xff"
    msg = parse_dhcp(memoryview(raw))
    assert list(msg.options.items()) == [(OPT_DOMAIN_SEARCH, b"abc"), (OPT_MESSAGE_TYPE, b"\x01")]


def test_message_type_absent_or_odd() -> None:
    assert parse_dhcp(memoryview(_header())).message_type is None
    assert parse_dhcp(memoryview(_header() + b"\x35\x02\x01\x01")).message_type is None


def test_long_option_is_split_and_joined() -> None:
    value = bytes(range(256)) * 2 + b"xyz"  # 515 bytes -> 255 + 255 + 5
    opts = build_options([(OPT_DOMAIN_SEARCH, value)])
    assert [opts[0:2], opts[257:259], opts[514:516]] == [b"\x77\xff", b"\x77\xff", b"\x77\x05"]
    assert opts[-1] == 0xFF
    assert len(opts) == 515 + 6 + 1
    msg = DhcpMessage(op=1, xid=1, chaddr=MAC, options={OPT_DOMAIN_SEARCH: value, OPT_HOSTNAME: b""})
    raw = build_dhcp(msg)
    assert parse_dhcp(memoryview(raw)).options == msg.options


def test_build_rejects_impossible_input() -> None:
    with pytest.raises(ValueError, match="code 0"):
        build_options([(0, b"x")])
    with pytest.raises(ValueError, match="code 255"):
        build_options([(255, b"x")])
    with pytest.raises(ValueError, match="too long"):
        build_dhcp(DhcpMessage(op=1, xid=1, chaddr=bytes(17)))


def test_build_min_len() -> None:
    msg = DhcpMessage(op=1, xid=1, chaddr=MAC, options={OPT_MESSAGE_TYPE: b"\x01"})
    assert len(build_dhcp(msg)) == 300
    assert len(build_dhcp(msg, min_len=0)) == DHCP_OPTIONS_OFFSET + 3 + 1


# --- option table --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "value", "wire"),
    [
        (1, IPv4Address("255.255.255.0"), b"\xff\xff\xff\x00"),
        (3, (IPv4Address("192.0.2.1"),), b"\xc0\x00\x02\x01"),
        (6, (IPv4Address("192.0.2.53"), IPv4Address("10.0.0.1")), b"\xc0\x00\x025\n\x00\x00\x01"),
        (12, "vm", b"vm"),
        (15, "example.com", b"example.com"),
        (26, 65520, b"\xff\xf0"),
        (51, 0xFFFFFFFF, b"\xff\xff\xff\xff"),
        (53, 5, b"\x05"),
        (55, b"\x01\x03", b"\x01\x03"),
        (57, 1500, b"\x05\xdc"),
        (58, 3600, b"\x00\x00\x0e\x10"),
        (119, ("a.b", "c"), b"\x01a\x01b\x00\x01c\x00"),
    ],
)
def test_option_table_round_trip(code: int, value: object, wire: bytes) -> None:
    assert encode_option(code, value) == wire
    assert decode_option(code, wire) == value
    assert OPTIONS[code].name


@pytest.mark.parametrize(
    ("code", "wire"),
    [
        (1, b"\xff\xff\xff"),
        (3, b""),
        (6, b"\x01\x02\x03\x04\x05"),
        (26, b"\x05"),
        (51, b"\x00" * 5),
        (53, b""),
    ],
)
def test_option_bad_value(code: int, wire: bytes) -> None:
    with pytest.raises(MalformedFrame) as exc:
        decode_option(code, wire)
    assert exc.value.reason == "dhcp.bad_option_value"


def test_unknown_option_is_raw() -> None:
    assert decode_option(200, b"\x01\x02") == b"\x01\x02"


def test_text_option_tolerates_nul_and_junk() -> None:
    assert decode_option(OPT_HOSTNAME, b"vm\x00") == "vm"
    assert decode_option(OPT_HOSTNAME, b"v\xffm") == "v\ufffdm"


def test_domain_search_rfc3397_example_with_compression() -> None:
    """RFC 3397 §3: eng.apple.com and marketing.apple.com, the second pointing into the first."""
    wire = b"\x03eng\x05apple\x03com\x00\x09marketing\xc0\x04"
    assert unpack_domain_search(wire) == ("eng.apple.com", "marketing.apple.com")
    assert unpack_domain_search(pack_domain_search(["eng.apple.com", "marketing.apple.com"])) == (
        "eng.apple.com",
        "marketing.apple.com",
    )
    assert pack_domain_search(["eng.apple.com."]) == wire[:15]


def test_domain_search_matches_dpkt_name_decoder() -> None:
    names = ["example.com", "corp.example.net", "x.y.z.w"]
    wire = pack_domain_search(names)
    off = 0
    seen = []
    while off < len(wire):
        name, off = dpkt.dns.unpack_name(wire, off)
        seen.append(name)
    assert seen == names


@pytest.mark.parametrize(
    "wire",
    [
        b"\xc0\x00",  # pointer to itself
        b"\x01a\xc0\x00",  # loop through a label
        b"\x03ab",  # label past the end
        b"\x03abc",  # no terminating zero
        b"\xc0",  # half a pointer
        b"\x40abc\x00",  # reserved label type
        b"\xc0\x10",  # pointer past the end
        (b"\x3f" + b"a" * 63) * 4 + b"\x00",  # 257 bytes, over the RFC 1035 limit
    ],
)
def test_domain_search_malformed(wire: bytes) -> None:
    with pytest.raises(MalformedFrame) as exc:
        unpack_domain_search(wire)
    assert exc.value.reason == "dhcp.bad_domain_name"


@pytest.mark.parametrize("name", ["", ".", "a..b", "a" * 64 + ".com", ".".join(["a" * 60] * 5), "ünï.de"])
def test_encode_dns_name_rejects(name: str) -> None:
    with pytest.raises(ValueError):  # UnicodeEncodeError is a ValueError too
        encode_dns_name(name)


# --- fuzz ------------------------------------------------------------------------------------------------


@given(st.binary(max_size=700))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    try:
        msg = parse_dhcp(memoryview(raw))
    except MalformedFrame:
        return
    assert isinstance(msg, DhcpMessage)


@given(st.binary(max_size=400))
def test_fuzz_options_area(tail: bytes) -> None:
    """Random bytes behind a valid header, so the option walker itself is exercised."""
    try:
        msg = parse_dhcp(memoryview(_header() + tail))
    except MalformedFrame as exc:
        assert exc.reason == "dhcp.bad_option_len"  # noqa: PT017 - a fuzz outcome is not known up front
        return
    assert sum(len(v) for v in msg.options.values()) <= len(tail)
    for code, value in msg.options.items():
        try:
            decode_option(code, value)
        except MalformedFrame:
            pass


@given(st.binary(max_size=300))
def test_fuzz_domain_search(raw: bytes) -> None:
    try:
        names = unpack_domain_search(raw)
    except MalformedFrame:
        return
    assert all(len(n) <= 255 for n in names)


_options = st.dictionaries(st.integers(min_value=1, max_value=254), st.binary(max_size=600), max_size=6)


@given(
    op=st.integers(0, 255),
    xid=st.integers(0, 2**32 - 1),
    chaddr=st.binary(min_size=16, max_size=16),
    hlen=st.integers(0, 16),
    flags=st.integers(0, 0xFFFF),
    addrs=st.lists(st.binary(min_size=4, max_size=4), min_size=4, max_size=4),
    options=_options,
)
def test_fuzz_build_parse_round_trip(
    op: int, xid: int, chaddr: bytes, hlen: int, flags: int, addrs: list[bytes], options: dict[int, bytes]
) -> None:
    msg = DhcpMessage(
        op=op,
        xid=xid,
        chaddr=chaddr,
        options=options,
        hlen=hlen,
        flags=flags,
        ciaddr=addrs[0],
        yiaddr=addrs[1],
        siaddr=addrs[2],
        giaddr=addrs[3],
        sname=b"s" * 64,
        file=b"f" * 128,
    )
    raw = build_dhcp(msg)
    assert parse_dhcp(memoryview(raw)) == msg
    oracle = dpkt.dhcp.DHCP(raw)
    joined: dict[int, bytes] = {}
    for code, value in oracle.opts:
        joined[code] = joined.get(code, b"") + value
    assert joined == options


# --- RFC 4702 Client FQDN (option 81) ----------------------------------------------------------------------


def test_client_fqdn_wire_form_round_trip() -> None:
    value = ClientFqdn(FQDN_FLAG_E, 255, 255, "vm.example.org")
    raw = encode_option(OPT_CLIENT_FQDN, value)
    assert raw == b"\x04\xff\xff\x02vm\x07example\x03org\x00"
    assert decode_option(OPT_CLIENT_FQDN, raw) == value


def test_client_fqdn_ascii_and_empty_names() -> None:
    """Without E the name is ASCII (deprecated, RFC 4702 §2.3.2); a client may send no name at all."""
    raw = encode_option(OPT_CLIENT_FQDN, ClientFqdn(FQDN_FLAG_S, 0, 0, "host.example."))
    assert raw == b"\x01\x00\x00host.example"
    assert decode_option(OPT_CLIENT_FQDN, raw + b"\x00") == ClientFqdn(FQDN_FLAG_S, 0, 0, "host.example")
    assert decode_option(OPT_CLIENT_FQDN, b"\x05\x00\x00") == ClientFqdn(5, 0, 0, "")


@pytest.mark.parametrize("raw", [b"", b"\x04\xff", b"\x04\xff\xff\x03ab", b"\x04\x00\x00\x40"])
def test_client_fqdn_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedFrame, match=r"dhcp\.bad_(option_value|domain_name)"):
        decode_option(OPT_CLIENT_FQDN, raw)


def test_client_fqdn_unencodable_name() -> None:
    with pytest.raises(ValueError, match="bad label"):
        encode_option(OPT_CLIENT_FQDN, ClientFqdn(FQDN_FLAG_E, 0, 0, "a..b"))
