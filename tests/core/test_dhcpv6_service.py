"""handle_dhcpv6 as pure request -> reply, with the exchanges dhclient -6 (isc-dhcp-client 4.4) performs."""

from __future__ import annotations

import dataclasses
import struct
from ipaddress import IPv6Address
from typing import NamedTuple

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.core.context import Context, Ip6Net, link_local_from_mac
from passtd.dataplane.core.services.dhcpv6 import handle_dhcpv6
from passtd.dataplane.packets.dhcpv6 import (
    FQDN_FLAG_O,
    ClientFqdn6,
    Dhcpv6Message,
    parse_client_fqdn,
    parse_dhcpv6,
    parse_ia,
    parse_ia_address,
    parse_status_code,
)
from passtd.dataplane.packets.ethernet import ETH_P_IPV6
from passtd.dataplane.packets.ipv6 import parse_ipv6
from passtd.dataplane.packets.udp import build_udp6, parse_udp
from passtd.errors import MalformedFrame

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_LL = link_local_from_mac(GUEST_MAC)
OUR_MAC = bytes.fromhex("9a559a559a55")
OUR_LL = link_local_from_mac(OUR_MAC)
GUEST_ADDR = IPv6Address("2001:db8:0:1::10")
DNS = (IPv6Address("2001:db8::53"), IPv6Address("2001:db8::54"))
NET = Ip6Net(addr=GUEST_ADDR, prefix_len=64, gateway=OUR_LL, our_ll=OUR_LL, dns=DNS)
CTX = Context(our_mac=OUR_MAC, ip6=NET, search=("example.com",))
SERVERS = IPv6Address("ff02::1:2")
CLIENT_DUID = bytes.fromhex("000100012c3b4a5d525400123456")
SERVER_DUID = bytes.fromhex("00030001") + OUR_MAC
IAID = 0x5400_1234
INF = 0xFFFFFFFF

SOLICIT, ADVERTISE, REQUEST, CONFIRM, RENEW, REBIND, REPLY, RELEASE, DECLINE = range(1, 10)
INFORMATION_REQUEST = 11


def opt(code: int, data: bytes) -> bytes:
    return struct.pack("!HH", code, len(data)) + data


def ia_na(iaid: int = IAID, *addrs: IPv6Address) -> bytes:
    inner = b"".join(opt(5, a.packed + struct.pack("!II", 0, 0)) for a in addrs)
    return opt(3, struct.pack("!III", iaid, 0, 0) + inner)


def client_msg(kind: int, *options: bytes, xid: int = 0x10203, client_id: bool = True) -> bytes:
    head = struct.pack("!I", kind << 24 | xid)
    cid = opt(1, CLIENT_DUID) if client_id else b""
    return head + cid + opt(8, b"\x00\x00") + b"".join(options)


def ask(
    payload: bytes, ctx: Context = CTX, dst: IPv6Address = SERVERS, sport: int = 546, dport: int = 547
) -> bytes | None:
    packet = build_udp6(GUEST_LL.packed, dst.packed, sport, dport, payload)
    ip6 = parse_ipv6(memoryview(packet))
    return handle_dhcpv6(ctx, GUEST_MAC, ip6, parse_udp(ip6.payload))


class Answer(NamedTuple):
    msg: Dhcpv6Message
    dport: int


def decode(frame: bytes | None) -> Answer:
    """Split with dpkt, check addressing and the UDP checksum (dpkt.in_cksum), parse the DHCPv6 message."""
    assert frame is not None
    eth = dpkt.ethernet.Ethernet(frame)
    assert (eth.dst, eth.src, eth.type) == (GUEST_MAC, OUR_MAC, ETH_P_IPV6)
    ip = eth.data
    assert (IPv6Address(ip.src), IPv6Address(ip.dst), ip.nxt) == (OUR_LL, GUEST_LL, 17)
    seg = bytes(frame[54:])
    assert ip.plen == len(seg)
    pseudo = ip.src + ip.dst + struct.pack("!I", len(seg)) + b"\x00\x00\x00\x11"
    assert dpkt.in_cksum(pseudo + seg) == 0, "bad UDP checksum"
    udp = dpkt.udp.UDP(seg)
    assert udp.sport == 547
    assert udp.ulen == len(seg)
    return Answer(parse_dhcpv6(memoryview(bytes(udp.data))), udp.dport)


def codes(msg: Dhcpv6Message) -> list[int]:
    return [o.code for o in msg.options]


def check_lease(msg: Dhcpv6Message, iaid: int = IAID) -> None:
    (raw_ia,) = msg.get_all(3)
    ia = parse_ia(3, raw_ia)
    assert (ia.iaid, ia.t1, ia.t2) == (iaid, INF, INF)
    addr = parse_ia_address(ia.options[0].data)
    assert (addr.addr, addr.preferred, addr.valid) == (GUEST_ADDR, INF, INF)


def check_dns(msg: Dhcpv6Message) -> None:
    assert msg.get(23) == DNS[0].packed + DNS[1].packed
    assert msg.get(24) == b"\x07example\x03com\x00"


def test_solicit_gets_advertise() -> None:
    ans = decode(ask(client_msg(SOLICIT, ia_na())))
    msg = ans.msg
    assert ans.dport == 546
    assert (msg.msg_type, msg.xid) == (ADVERTISE, 0x10203)
    assert msg.get(2) == SERVER_DUID
    assert msg.get(1) == CLIENT_DUID
    assert msg.get(7) == b"\xff"  # preference 255: the client need not wait for other servers
    assert msg.get(14) is None
    check_lease(msg)
    check_dns(msg)


def test_solicit_with_rapid_commit_gets_reply() -> None:
    msg = decode(ask(client_msg(SOLICIT, ia_na(), opt(14, b"")))).msg
    assert msg.msg_type == REPLY
    assert msg.get(14) == b""
    check_lease(msg)


def test_solicit_with_server_id_ignored() -> None:
    assert ask(client_msg(SOLICIT, ia_na(), opt(2, SERVER_DUID))) is None


def test_request_gets_reply_with_address() -> None:
    msg = decode(ask(client_msg(REQUEST, opt(2, SERVER_DUID), ia_na(IAID, GUEST_ADDR)))).msg
    assert msg.msg_type == REPLY
    assert msg.get(1) == CLIENT_DUID
    check_lease(msg)
    check_dns(msg)
    ia = parse_ia(3, msg.get_all(3)[0])
    assert len(ia.options) == 1


@pytest.mark.parametrize("server_id", [None, bytes.fromhex("00030001aabbccddeeff")])
def test_request_for_other_server_ignored(server_id: bytes | None) -> None:
    extra = () if server_id is None else (opt(2, server_id),)
    assert ask(client_msg(REQUEST, *extra, ia_na())) is None


def test_renew_unicast_with_stale_address_releases_it() -> None:
    stale = IPv6Address("2001:db8:0:1::99")
    msg = decode(ask(client_msg(RENEW, opt(2, SERVER_DUID), ia_na(IAID, stale)), dst=OUR_LL)).msg
    assert msg.msg_type == REPLY
    ia = parse_ia(3, msg.get_all(3)[0])
    addrs = [parse_ia_address(o.data) for o in ia.options]
    assert [(a.addr, a.preferred, a.valid) for a in addrs] == [(GUEST_ADDR, INF, INF), (stale, 0, 0)]


def test_rebind() -> None:
    assert decode(ask(client_msg(REBIND, ia_na(IAID, GUEST_ADDR)))).msg.msg_type == REPLY
    assert ask(client_msg(REBIND, opt(2, SERVER_DUID), ia_na())) is None


@pytest.mark.parametrize(
    ("addr", "status"), [(GUEST_ADDR, 0), (IPv6Address("2001:db8:0:1::99"), 4), (IPv6Address("fd00::1"), 4)]
)
def test_confirm(addr: IPv6Address, status: int) -> None:
    msg = decode(ask(client_msg(CONFIRM, ia_na(IAID, addr)))).msg
    assert msg.msg_type == REPLY
    assert parse_status_code(msg.get(13) or b"")[0] == status
    assert msg.get(3) is None
    assert msg.get(2) == SERVER_DUID


def test_confirm_without_addresses_not_answered() -> None:
    assert ask(client_msg(CONFIRM, ia_na())) is None


def test_information_request_gets_dns_only() -> None:
    msg = decode(ask(client_msg(INFORMATION_REQUEST, opt(6, struct.pack("!HH", 23, 24))))).msg
    assert msg.msg_type == REPLY
    assert codes(msg) == [2, 1, 23, 24]
    check_dns(msg)


def test_information_request_rules() -> None:
    assert ask(client_msg(INFORMATION_REQUEST, opt(2, SERVER_DUID))) is not None
    assert ask(client_msg(INFORMATION_REQUEST, opt(2, b"\x00\x03\x00\x01abcdef"))) is None
    assert ask(client_msg(INFORMATION_REQUEST, ia_na())) is None


@pytest.mark.parametrize("kind", [RELEASE, DECLINE])
def test_release_and_decline_acknowledged(kind: int) -> None:
    msg = decode(ask(client_msg(kind, opt(2, SERVER_DUID), ia_na(IAID, GUEST_ADDR)))).msg
    assert msg.msg_type == REPLY
    assert parse_status_code(msg.get(13) or b"") == (0, "")


def test_extra_ias_get_no_addrs_and_no_prefix() -> None:
    ta = opt(4, struct.pack("!I", 9))
    pd = opt(25, struct.pack("!III", 7, 0, 0))
    msg = decode(ask(client_msg(SOLICIT, ia_na(1), ia_na(2), ta, pd))).msg
    first, second = (parse_ia(3, raw) for raw in msg.get_all(3))
    assert first.iaid == 1
    assert parse_ia_address(first.options[0].data).addr == GUEST_ADDR
    assert second.iaid == 2
    assert parse_status_code(second.options[0].data)[0] == 2
    ta_ia = parse_ia(4, msg.get(4) or b"")
    assert (ta_ia.iaid, parse_status_code(ta_ia.options[0].data)[0]) == (9, 2)
    pd_ia = parse_ia(25, msg.get(25) or b"")
    assert (pd_ia.iaid, parse_status_code(pd_ia.options[0].data)[0]) == (7, 6)


def test_no_dhcp_dns_and_no_dhcp_search_flags() -> None:
    """--no-dhcp-dns / --no-dhcp-search: the lists exist but are not offered, each on its own."""
    msg = decode(ask(client_msg(SOLICIT, ia_na()), ctx=dataclasses.replace(CTX, dhcp_dns=False))).msg
    assert msg.get(23) is None and msg.get(24) == b"\x07example\x03com\x00"
    msg = decode(ask(client_msg(INFORMATION_REQUEST), ctx=dataclasses.replace(CTX, dhcp_search=False))).msg
    assert msg.get(23) == DNS[0].packed + DNS[1].packed and msg.get(24) is None


def test_client_fqdn_option_39() -> None:
    """RFC 4704: flags 0, or O when the client set S (we update no DNS), then the name in wire form; in
    Advertise, Reply and Information-request replies, whether asked or not (passt's dhcpv6.c)."""
    ctx = dataclasses.replace(CTX, fqdn="vm.example.com")
    name = b"\x02vm\x07example\x03com\x00"
    assert decode(ask(client_msg(SOLICIT, ia_na()), ctx=ctx)).msg.get(39) == b"\x00" + name
    asked = client_msg(REQUEST, opt(2, SERVER_DUID), ia_na(), opt(39, b"\x01\x02vm\x00"))
    msg = decode(ask(asked, ctx=ctx)).msg
    assert msg.get(39) == b"\x02" + name
    assert parse_client_fqdn(msg.get(39) or b"") == ClientFqdn6(FQDN_FLAG_O, "vm.example.com")
    assert decode(ask(client_msg(INFORMATION_REQUEST), ctx=ctx)).msg.get(39) == b"\x00" + name
    assert decode(ask(client_msg(SOLICIT, ia_na()))).msg.get(39) is None  # not configured
    bad = dataclasses.replace(CTX, fqdn="x" * 64)  # a label too long to encode: left out
    assert decode(ask(client_msg(SOLICIT, ia_na()), ctx=bad)).msg.get(39) is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x01", ClientFqdn6(1, "")),
        (b"\x00\x02vm", ClientFqdn6(0, "vm")),  # a partial name: no root label (RFC 4704 §4.2)
        (b"\x04\x01a\x01b\x00", ClientFqdn6(4, "a.b")),
    ],
)
def test_parse_client_fqdn(data: bytes, expected: ClientFqdn6) -> None:
    assert parse_client_fqdn(data) == expected


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "dhcpv6.fqdn_truncated"), (b"\x00\x05ab", "dhcpv6.bad_fqdn"), (b"\x00\x00\x01", "dhcpv6.bad_fqdn"),
     (b"\x00\x40" + bytes(64), "dhcpv6.bad_fqdn")],
)  # fmt: skip
def test_parse_client_fqdn_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame) as exc:
        parse_client_fqdn(data)
    assert exc.value.reason == reason


def test_no_dns_no_search() -> None:
    ctx = dataclasses.replace(CTX, search=(), ip6=dataclasses.replace(NET, dns=()))
    msg = decode(ask(client_msg(SOLICIT, ia_na()), ctx=ctx)).msg
    assert msg.get(23) is None
    assert msg.get(24) is None


@pytest.mark.parametrize(
    ("payload", "ctx", "dport"),
    [
        (client_msg(SOLICIT, ia_na()), dataclasses.replace(CTX, dhcpv6=False), 547),
        (client_msg(SOLICIT, ia_na()), dataclasses.replace(CTX, ip6=None), 547),
        (client_msg(SOLICIT, ia_na()), CTX, 546),
        (client_msg(SOLICIT, ia_na(), client_id=False), CTX, 547),
        (client_msg(SOLICIT, opt(1, b"\x00"), client_id=False), CTX, 547),
        (client_msg(ADVERTISE, ia_na()), CTX, 547),
        (client_msg(REPLY, ia_na()), CTX, 547),
        (bytes((12, 0)) + bytes(40), CTX, 547),
        (b"", CTX, 547),
    ],
)
def test_not_answered(payload: bytes, ctx: Context, dport: int) -> None:
    assert ask(payload, ctx=ctx, dport=dport) is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x01\x00\x00", "dhcpv6.truncated"),
        (client_msg(SOLICIT) + b"\x00\x03\x00\x20", "dhcpv6.bad_option_len"),
        (client_msg(SOLICIT, opt(3, bytes(8))), "dhcpv6.ia_truncated"),
        (
            client_msg(REQUEST, opt(2, SERVER_DUID), opt(3, bytes(12) + opt(5, bytes(10)))),
            "dhcpv6.iaaddr_truncated",
        ),
    ],
)
def test_malformed_raises_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame) as exc:
        ask(payload)
    assert exc.value.reason == reason


@given(st.binary(max_size=200))
def test_fuzz_arbitrary_payload(payload: bytes) -> None:
    try:
        out = ask(payload)
    except MalformedFrame:
        return
    if out is not None:
        decode(out)


@given(
    st.sampled_from([SOLICIT, REQUEST, CONFIRM, RENEW, REBIND, RELEASE, DECLINE, INFORMATION_REQUEST]),
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from([1, 2, 3, 4, 5, 13, 14, 25]), st.binary(max_size=40)),
            st.just((2, SERVER_DUID)),
            st.just((1, CLIENT_DUID)),
        ),
        max_size=6,
    ),
)
def test_fuzz_structured_messages(kind: int, options: list[tuple[int, bytes]]) -> None:
    payload = struct.pack("!I", kind << 24 | 7) + b"".join(opt(c, d) for c, d in options)
    try:
        out = ask(payload)
    except MalformedFrame:
        return
    if out is not None:
        assert decode(out).msg.xid == 7


@pytest.mark.parametrize("src", [IPv6Address("::"), IPv6Address("ff02::1")])
def test_no_reply_to_unusable_source(src: IPv6Address) -> None:
    packet = build_udp6(src.packed, SERVERS.packed, 546, 547, client_msg(SOLICIT, ia_na()))
    ip6 = parse_ipv6(memoryview(packet))
    assert handle_dhcpv6(CTX, GUEST_MAC, ip6, parse_udp(ip6.payload)) is None
