"""Single-lease DHCP server as pure request -> reply; dpkt reads every reply as an independent oracle."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.core.context import Context, Ip4Net
from passtd.dataplane.core.services.dhcp import handle_dhcp
from passtd.dataplane.packets.checksum import pseudo_header4
from passtd.dataplane.packets.dhcp import (
    DHCPACK,
    DHCPDECLINE,
    DHCPDISCOVER,
    DHCPINFORM,
    DHCPNAK,
    DHCPOFFER,
    DHCPRELEASE,
    DHCPREQUEST,
    OPT_CLIENT_FQDN,
    OPT_CLIENT_ID,
    OPT_DNS,
    OPT_DOMAIN_NAME,
    OPT_DOMAIN_SEARCH,
    OPT_HOSTNAME,
    OPT_LEASE_TIME,
    OPT_MAX_MESSAGE_SIZE,
    OPT_MESSAGE,
    OPT_MESSAGE_TYPE,
    OPT_MTU,
    OPT_PARAM_REQUEST,
    OPT_REQUESTED_IP,
    OPT_ROUTER,
    OPT_SERVER_ID,
    OPT_SUBNET_MASK,
    ClientFqdn,
    decode_option,
    encode_dns_name,
    unpack_domain_search,
)
from passtd.dataplane.packets.udp import UdpHeader, parse_udp
from passtd.errors import MalformedFrame

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")
ADDR = IPv4Address("192.0.2.10")
GW = IPv4Address("192.0.2.1")
DNS = (IPv4Address("192.0.2.53"), IPv4Address("198.51.100.53"))
CTX = Context(
    our_mac=OUR_MAC,
    mtu=65520,
    ip4=Ip4Net(addr=ADDR, prefix_len=24, gateway=GW, dns=DNS),
    search=("example.com", "corp.example.net."),
)
DHCLIENT_PRL = bytes([1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42])
LEASE_OPTIONS = {
    OPT_MESSAGE_TYPE,
    OPT_SERVER_ID,
    OPT_LEASE_TIME,
    OPT_SUBNET_MASK,
    OPT_ROUTER,
    OPT_DNS,
    OPT_DOMAIN_NAME,
    OPT_DOMAIN_SEARCH,
    OPT_MTU,
}


def request(
    msg_type: int | None,
    *,
    opts: list[tuple[int, bytes]] | None = None,
    ciaddr: IPv4Address | None = None,
    op: int = 1,
    xid: int = 0x6C67AC6C,
    flags: int = 0,
    dport: int = 67,
) -> UdpHeader:
    """A client message as the demux hands it over: built by dpkt, then parsed by our UDP codec."""
    options = [] if msg_type is None else [(OPT_MESSAGE_TYPE, bytes((msg_type,)))]
    options += opts if opts is not None else [(OPT_PARAM_REQUEST, DHCLIENT_PRL)]
    dhcp = dpkt.dhcp.DHCP(
        op=op, xid=xid, flags=flags, chaddr=GUEST_MAC, ciaddr=int(ciaddr or 0), opts=options
    )
    payload = bytes(dhcp)
    payload += bytes(max(0, 300 - len(payload)))
    udp = dpkt.udp.UDP(sport=68, dport=dport, data=payload)
    udp.ulen = len(udp)
    return parse_udp(memoryview(bytes(udp)))


class Reply:
    """A reply frame taken apart by dpkt, with every header checked on the way."""

    def __init__(self, frame: bytes | None) -> None:
        assert frame is not None
        eth = dpkt.ethernet.Ethernet(frame)
        assert (eth.dst, eth.src, eth.type) == (GUEST_MAC, OUR_MAC, dpkt.ethernet.ETH_TYPE_IP)
        ip = eth.data
        assert isinstance(ip, dpkt.ip.IP)
        assert (ip.src, ip.dst, ip.p) == (GW.packed, b"\xff" * 4, dpkt.ip.IP_PROTO_UDP)
        assert len(frame) == 14 + ip.len
        raw_ip = frame[14:]
        assert dpkt.in_cksum(raw_ip[: ip.hl * 4]) == 0
        udp = ip.data
        assert isinstance(udp, dpkt.udp.UDP)
        assert (udp.sport, udp.dport, udp.ulen) == (67, 68, ip.len - 20)
        raw_udp = raw_ip[20:]
        assert udp.sum != 0
        assert dpkt.in_cksum(pseudo_header4(ip.src, ip.dst, 17, len(raw_udp)) + raw_udp) == 0
        self.frame = frame
        self.payload = bytes(udp.data)
        self.dhcp = dpkt.dhcp.DHCP(self.payload)
        self.opts: dict[int, bytes] = {}
        for code, value in self.dhcp.opts:
            self.opts[code] = self.opts.get(code, b"") + bytes(value)  # RFC 3396 join
        self.codes = [code for code, _ in self.dhcp.opts]

    @property
    def msg_type(self) -> int:
        return self.opts[OPT_MESSAGE_TYPE][0]


def test_discover_gets_offer_with_exactly_the_lease_fields() -> None:
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(DHCPDISCOVER, flags=0x8000)))
    d = reply.dhcp
    assert (d.op, d.hrd, d.hln, d.hops, d.xid, d.flags) == (2, 1, 6, 0, 0x6C67AC6C, 0x8000)
    assert d.chaddr == GUEST_MAC
    assert IPv4Address(d.yiaddr) == ADDR
    assert d.ciaddr == d.siaddr == d.giaddr == 0
    assert reply.msg_type == DHCPOFFER
    assert set(reply.opts) == LEASE_OPTIONS
    assert len(reply.codes) == len(LEASE_OPTIONS)  # nothing split or repeated
    assert reply.opts[OPT_SERVER_ID] == GW.packed
    assert reply.opts[OPT_LEASE_TIME] == b"\xff\xff\xff\xff"
    assert reply.opts[OPT_SUBNET_MASK] == IPv4Address("255.255.255.0").packed
    assert reply.opts[OPT_ROUTER] == GW.packed
    assert reply.opts[OPT_DNS] == DNS[0].packed + DNS[1].packed
    assert reply.opts[OPT_DOMAIN_NAME] == b"example.com"
    assert reply.opts[OPT_MTU] == (65520).to_bytes(2, "big")
    assert unpack_domain_search(reply.opts[OPT_DOMAIN_SEARCH]) == ("example.com", "corp.example.net")
    assert 300 <= len(reply.payload) <= 576 - 28
    assert d.data == bytes(len(d.data))  # after END only PAD


def test_search_list_decodes_with_dpkt_name_reader() -> None:
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(DHCPDISCOVER)))
    wire = reply.opts[OPT_DOMAIN_SEARCH]
    assert wire == b"\x07example\x03com\x00\x04corp\x07example\x03net\x00"
    first, off = dpkt.dns.unpack_name(wire, 0)
    second, off = dpkt.dns.unpack_name(wire, off)
    assert (first, second, off) == ("example.com", "corp.example.net", len(wire))


def test_options_follow_parameter_request_order() -> None:
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(DHCPDISCOVER)))
    assert reply.codes[:3] == [OPT_MESSAGE_TYPE, OPT_SERVER_ID, OPT_LEASE_TIME]
    # dhclient asks 1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, ...: we have 1, 3, 15, 6, 119, 26
    assert reply.codes[3:] == [
        OPT_SUBNET_MASK,
        OPT_ROUTER,
        OPT_DOMAIN_NAME,
        OPT_DNS,
        OPT_DOMAIN_SEARCH,
        OPT_MTU,
    ]
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(DHCPDISCOVER, opts=[(OPT_PARAM_REQUEST, b"\x1a\x06")])))
    assert reply.codes[3:5] == [OPT_MTU, OPT_DNS]
    assert set(reply.opts) == LEASE_OPTIONS  # unrequested ones still come


def test_request_for_lease_gets_ack() -> None:
    opts = [(OPT_REQUESTED_IP, ADDR.packed), (OPT_SERVER_ID, GW.packed), (OPT_PARAM_REQUEST, DHCLIENT_PRL)]
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(DHCPREQUEST, opts=opts, xid=99)))
    assert reply.msg_type == DHCPACK
    assert reply.dhcp.xid == 99
    assert IPv4Address(reply.dhcp.yiaddr) == ADDR
    assert reply.dhcp.ciaddr == 0
    assert set(reply.opts) == LEASE_OPTIONS


def test_renewing_request_by_ciaddr_gets_ack() -> None:
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(DHCPREQUEST, ciaddr=ADDR)))
    assert reply.msg_type == DHCPACK
    assert IPv4Address(reply.dhcp.yiaddr) == ADDR
    assert IPv4Address(reply.dhcp.ciaddr) == ADDR  # RFC 2131 table 3: ciaddr from the request


def test_request_without_any_address_gets_ack() -> None:
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(DHCPREQUEST)))
    assert reply.msg_type == DHCPACK


@pytest.mark.parametrize(
    "kwargs",
    [
        {"opts": [(OPT_REQUESTED_IP, IPv4Address("10.0.2.15").packed)]},
        {"opts": [(OPT_REQUESTED_IP, IPv4Address("10.0.2.15").packed), (OPT_SERVER_ID, GW.packed)]},
        {"ciaddr": IPv4Address("10.0.2.15")},
    ],
)
def test_request_for_other_address_gets_nak(kwargs: dict[str, object]) -> None:
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(DHCPREQUEST, **kwargs)))  # type: ignore[arg-type]
    assert reply.msg_type == DHCPNAK
    assert reply.dhcp.yiaddr == reply.dhcp.ciaddr == reply.dhcp.siaddr == 0
    assert set(reply.opts) == {OPT_MESSAGE_TYPE, OPT_SERVER_ID, OPT_MESSAGE}
    assert reply.opts[OPT_SERVER_ID] == GW.packed
    assert len(reply.payload) == 300


def test_request_to_another_server_is_ignored() -> None:
    opts = [(OPT_REQUESTED_IP, ADDR.packed), (OPT_SERVER_ID, IPv4Address("192.0.2.254").packed)]
    assert handle_dhcp(CTX, GUEST_MAC, request(DHCPREQUEST, opts=opts)) is None


def test_inform_gets_ack_without_lease() -> None:
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(DHCPINFORM, ciaddr=ADDR)))
    assert reply.msg_type == DHCPACK
    assert reply.dhcp.yiaddr == 0
    assert IPv4Address(reply.dhcp.ciaddr) == ADDR
    assert set(reply.opts) == LEASE_OPTIONS - {OPT_LEASE_TIME}


def test_bootp_request_gets_plain_bootreply() -> None:
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(None, opts=[])))
    assert reply.dhcp.op == 2
    assert IPv4Address(reply.dhcp.yiaddr) == ADDR
    assert OPT_MESSAGE_TYPE not in reply.opts
    assert OPT_LEASE_TIME not in reply.opts
    assert reply.opts[OPT_ROUTER] == GW.packed


@pytest.mark.parametrize("msg_type", [DHCPDECLINE, DHCPRELEASE, DHCPOFFER, DHCPACK, DHCPNAK, 0, 42])
def test_silent_message_types(msg_type: int) -> None:
    assert handle_dhcp(CTX, GUEST_MAC, request(msg_type)) is None


def test_silent_cases() -> None:
    assert handle_dhcp(dataclasses.replace(CTX, ip4=None), GUEST_MAC, request(DHCPDISCOVER)) is None
    assert handle_dhcp(dataclasses.replace(CTX, dhcp=False), GUEST_MAC, request(DHCPDISCOVER)) is None
    assert handle_dhcp(CTX, GUEST_MAC, request(DHCPDISCOVER, op=2)) is None
    assert handle_dhcp(CTX, GUEST_MAC, request(DHCPDISCOVER, dport=68)) is None
    bad_type = request(None, opts=[(OPT_MESSAGE_TYPE, b"\x01\x01")])
    assert handle_dhcp(CTX, GUEST_MAC, bad_type) is None


def test_malformed_request_raises_for_the_tap_boundary() -> None:
    with pytest.raises(MalformedFrame) as exc:
        handle_dhcp(CTX, GUEST_MAC, UdpHeader(68, 67, 8 + 10, memoryview(bytes(10))))
    assert exc.value.reason == "dhcp.truncated"


@pytest.mark.parametrize(
    ("mtu", "present"), [(65520, True), (65535, True), (68, True), (67, False), (65536, False)]
)
def test_mtu_option_only_when_it_fits(mtu: int, present: bool) -> None:
    reply = Reply(handle_dhcp(dataclasses.replace(CTX, mtu=mtu), GUEST_MAC, request(DHCPDISCOVER)))
    assert (OPT_MTU in reply.opts) is present
    if present:
        assert int.from_bytes(reply.opts[OPT_MTU], "big") == mtu


def test_mtu_zero_offers_no_mtu() -> None:
    """-m 0 (passt: "a zero value disables assignment"): the lease carries no option 26."""
    reply = Reply(handle_dhcp(dataclasses.replace(CTX, assign_mtu=False), GUEST_MAC, request(DHCPDISCOVER)))
    assert OPT_MTU not in reply.opts and OPT_ROUTER in reply.opts


def test_no_dns_no_search() -> None:
    ip4 = Ip4Net(addr=ADDR, prefix_len=16, gateway=GW)
    ctx = dataclasses.replace(CTX, ip4=ip4, search=())
    reply = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPDISCOVER)))
    assert set(reply.opts) == LEASE_OPTIONS - {OPT_DNS, OPT_DOMAIN_NAME, OPT_DOMAIN_SEARCH}
    assert reply.opts[OPT_SUBNET_MASK] == IPv4Address("255.255.0.0").packed
    assert len(reply.payload) == 300


def test_unencodable_search_entries_are_skipped() -> None:
    ctx = dataclasses.replace(CTX, search=("bad..name", "ok.example", "x" * 70 + ".org"))
    reply = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPDISCOVER)))
    assert reply.opts[OPT_DOMAIN_NAME] == b"ok.example"
    assert unpack_domain_search(reply.opts[OPT_DOMAIN_SEARCH]) == ("ok.example",)


LONG_SEARCH = tuple(f"domain{i:02d}.{'sub' * 10}.example.org" for i in range(20))  # 20 x 53 bytes


def test_reply_is_trimmed_to_576() -> None:
    ctx = dataclasses.replace(CTX, search=LONG_SEARCH)
    reply = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPDISCOVER)))
    assert len(reply.payload) <= 576 - 28
    names = unpack_domain_search(reply.opts[OPT_DOMAIN_SEARCH])
    assert 1 <= len(names) < len(LONG_SEARCH)
    assert names == LONG_SEARCH[: len(names)]
    assert reply.opts[OPT_DNS] == DNS[0].packed + DNS[1].packed
    assert reply.opts[OPT_DOMAIN_NAME] == LONG_SEARCH[0].encode()


def test_large_max_message_size_allows_split_search_option() -> None:
    ctx = dataclasses.replace(CTX, search=LONG_SEARCH)
    opts = [(OPT_MAX_MESSAGE_SIZE, (1500).to_bytes(2, "big")), (OPT_PARAM_REQUEST, DHCLIENT_PRL)]
    reply = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPDISCOVER, opts=opts)))
    assert len(reply.payload) <= 1500 - 28
    assert reply.codes.count(OPT_DOMAIN_SEARCH) >= 4  # > 255 bytes: split per RFC 3396
    assert unpack_domain_search(reply.opts[OPT_DOMAIN_SEARCH]) == LONG_SEARCH


def test_many_dns_servers_are_trimmed_last() -> None:
    dns = tuple(IPv4Address(f"10.0.{i}.1") for i in range(100))
    ctx = dataclasses.replace(CTX, ip4=Ip4Net(ADDR, 24, GW, dns), search=LONG_SEARCH)
    reply = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPDISCOVER)))
    assert len(reply.payload) <= 576 - 28
    # extra search domains went first, then DNS servers were cut, the first search domain stays
    assert unpack_domain_search(reply.opts[OPT_DOMAIN_SEARCH]) == LONG_SEARCH[:1]
    assert reply.opts[OPT_DOMAIN_NAME] == LONG_SEARCH[0].encode()
    servers = reply.opts[OPT_DNS]
    assert 1 <= len(servers) // 4 < 100
    assert servers == b"".join(a.packed for a in dns[: len(servers) // 4])


def test_search_option_goes_when_nothing_else_is_left() -> None:
    huge = ".".join(["a" * 62] * 4)  # 251 characters, 253 bytes on the wire
    ctx = dataclasses.replace(CTX, ip4=Ip4Net(ADDR, 24, GW, DNS[:1]), search=(huge,))
    reply = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPDISCOVER)))
    assert len(reply.payload) <= 576 - 28
    assert OPT_DOMAIN_SEARCH not in reply.opts
    assert reply.opts[OPT_DOMAIN_NAME] == huge.encode()
    assert reply.opts[OPT_DNS] == DNS[0].packed


def test_bad_max_message_size_is_ignored() -> None:
    opts = [(OPT_MAX_MESSAGE_SIZE, b"\x05"), (OPT_CLIENT_ID, b"\x01" + GUEST_MAC)]
    reply = Reply(handle_dhcp(dataclasses.replace(CTX, search=LONG_SEARCH), GUEST_MAC, request(1, opts=opts)))
    assert len(reply.payload) <= 576 - 28


def test_small_mtu_still_answers() -> None:
    reply = Reply(handle_dhcp(dataclasses.replace(CTX, mtu=500), GUEST_MAC, request(DHCPDISCOVER)))
    assert OPT_MTU in reply.opts
    assert reply.msg_type == DHCPOFFER


@given(st.binary(max_size=600))
def test_fuzz_any_payload(payload: bytes) -> None:
    udp = UdpHeader(68, 67, 8 + len(payload), memoryview(payload))
    try:
        frame = handle_dhcp(CTX, GUEST_MAC, udp)
    except MalformedFrame:
        return
    assert frame is None or isinstance(frame, bytes)


@given(
    msg_type=st.integers(0, 10),
    options=st.lists(st.tuples(st.integers(1, 254), st.binary(max_size=40)), max_size=8),
)
def test_fuzz_options_always_yield_a_readable_reply(msg_type: int, options: list[tuple[int, bytes]]) -> None:
    try:
        frame = handle_dhcp(CTX, GUEST_MAC, request(msg_type, opts=options))
    except MalformedFrame:  # pragma: no cover - dpkt builds valid TLVs
        raise AssertionError("valid TLVs must parse") from None
    if frame is not None:
        reply = Reply(frame)
        assert reply.msg_type in (DHCPOFFER, DHCPACK, DHCPNAK)
        assert len(reply.payload) <= 1500


# --- names (RFC 2132 §3.14, RFC 4702) and --no-dhcp-dns / --no-dhcp-search ----------------------------------


def test_hostname_and_fqdn_as_passt_sends_them() -> None:
    """Option 12 as text, option 81 with flags E, RCODE1 = RCODE2 = 255 and the name in wire form, both sent
    although the client did not ask for them (passt's dhcp.c does the same)."""
    ctx = dataclasses.replace(CTX, hostname="vm1", fqdn="vm1.example.com")
    reply = Reply(
        handle_dhcp(ctx, GUEST_MAC, request(DHCPDISCOVER, opts=[(OPT_PARAM_REQUEST, bytes([1, 3]))]))
    )
    assert reply.opts[OPT_HOSTNAME] == b"vm1"
    assert reply.opts[OPT_CLIENT_FQDN] == b"\x04\xff\xff\x03vm1\x07example\x03com\x00"
    assert decode_option(OPT_CLIENT_FQDN, reply.opts[OPT_CLIENT_FQDN]) == ClientFqdn(
        4, 255, 255, "vm1.example.com"
    )
    ack = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPREQUEST, opts=[(OPT_REQUESTED_IP, ADDR.packed)])))
    assert ack.msg_type == DHCPACK and ack.opts[OPT_HOSTNAME] == b"vm1" and OPT_CLIENT_FQDN in ack.opts


def test_no_names_by_default_and_unencodable_fqdn_left_out() -> None:
    reply = Reply(handle_dhcp(CTX, GUEST_MAC, request(DHCPDISCOVER)))
    assert OPT_HOSTNAME not in reply.opts and OPT_CLIENT_FQDN not in reply.opts
    ctx = dataclasses.replace(CTX, hostname="h", fqdn="a" * 64 + ".example")  # a label over 63 octets
    reply = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPDISCOVER)))
    assert reply.opts[OPT_HOSTNAME] == b"h" and OPT_CLIENT_FQDN not in reply.opts


def test_names_dropped_last_when_the_reply_does_not_fit() -> None:
    """Long names on a 576-byte client: search and extra DNS go first, then option 81, then option 12."""
    fqdn = ".".join(["l" * 60] * 4)  # 248 characters, 250 octets in wire form
    ctx = dataclasses.replace(CTX, hostname="h" * 200, fqdn=fqdn)
    reply = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPDISCOVER)))
    assert len(reply.payload) <= 576 - 28
    assert OPT_CLIENT_FQDN not in reply.opts and reply.opts[OPT_HOSTNAME] == b"h" * 200
    assert OPT_DOMAIN_SEARCH not in reply.opts and reply.opts[OPT_DNS] == DNS[0].packed
    big = [(OPT_MAX_MESSAGE_SIZE, (1500).to_bytes(2, "big")), (OPT_PARAM_REQUEST, DHCLIENT_PRL)]
    reply = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPDISCOVER, opts=big)))
    assert reply.opts[OPT_CLIENT_FQDN][3:] == encode_dns_name(fqdn) and OPT_DOMAIN_SEARCH in reply.opts


def test_no_dhcp_dns_and_no_dhcp_search() -> None:
    reply = Reply(handle_dhcp(dataclasses.replace(CTX, dhcp_dns=False), GUEST_MAC, request(DHCPDISCOVER)))
    assert OPT_DNS not in reply.opts and OPT_DOMAIN_SEARCH in reply.opts
    reply = Reply(handle_dhcp(dataclasses.replace(CTX, dhcp_search=False), GUEST_MAC, request(DHCPDISCOVER)))
    assert reply.opts[OPT_DNS] == b"".join(a.packed for a in DNS)
    assert OPT_DOMAIN_SEARCH not in reply.opts and OPT_DOMAIN_NAME not in reply.opts
    ctx = dataclasses.replace(CTX, dhcp_dns=False, dhcp_search=False)
    reply = Reply(handle_dhcp(ctx, GUEST_MAC, request(DHCPINFORM)))
    assert {OPT_DNS, OPT_DOMAIN_SEARCH, OPT_DOMAIN_NAME}.isdisjoint(reply.opts)
    assert reply.opts[OPT_ROUTER] == GW.packed
