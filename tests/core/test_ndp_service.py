"""NdpResponder as pure request -> reply: RS->RA contents, NS->NA rules (DAD included), the RA timer."""

from __future__ import annotations

import dataclasses
import random
import struct
from ipaddress import IPv6Address
from typing import NamedTuple

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.core.context import Context, Ip6Net, link_local_from_mac
from passtd.dataplane.core.services.ndp import NdpResponder
from passtd.dataplane.packets.ethernet import ETH_P_IPV6
from passtd.dataplane.packets.ipv6 import Ip6Header, parse_ipv6
from passtd.dataplane.packets.ndp import NdpOption, parse_options
from passtd.errors import MalformedFrame

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_LL = link_local_from_mac(GUEST_MAC)
OUR_MAC = bytes.fromhex("9a559a559a55")
OUR_LL = link_local_from_mac(OUR_MAC)
GUEST_ADDR = IPv6Address("2001:db8:0:1::10")
GATEWAY = IPv6Address("2001:db8:0:1::1")
DNS = (IPv6Address("2001:db8::53"), IPv6Address("2001:db8::54"))
NET = Ip6Net(addr=GUEST_ADDR, prefix_len=64, gateway=GATEWAY, our_ll=OUR_LL, dns=DNS)
CTX = Context(our_mac=OUR_MAC, mtu=65520, ip6=NET, search=("example.com", "lan"))
UNSPEC = IPv6Address("::")
ALL_NODES = IPv6Address("ff02::1")
ALL_NODES_MAC = bytes.fromhex("333300000001")


def solicited_node(addr: IPv6Address) -> IPv6Address:
    return IPv6Address(b"\xff\x02" + bytes(9) + b"\x01\xff" + addr.packed[13:])


def icmp6(
    src: IPv6Address, dst: IPv6Address, typ: int, body: bytes, *, code: int = 0, hop: int = 255
) -> Ip6Header:
    """The guest's packet, built and checksummed by dpkt, parsed by the project's IPv6 parser."""
    msg = dpkt.icmp6.ICMP6(type=typ, code=code, data=body)
    ip = dpkt.ip6.IP6(src=src.packed, dst=dst.packed, nxt=58, hlim=hop, data=msg)
    ip.plen = len(msg)
    return parse_ipv6(memoryview(bytes(ip)))


def rs(src: IPv6Address = GUEST_LL, sllao: bool = True, hop: int = 255) -> Ip6Header:
    opts = b"\x01\x01" + GUEST_MAC if sllao else b""
    return icmp6(src, IPv6Address("ff02::2"), 133, bytes(4) + opts, hop=hop)


def ns(target: IPv6Address, src: IPv6Address = GUEST_LL, dst: IPv6Address | None = None) -> Ip6Header:
    opts = b"" if src == UNSPEC else b"\x01\x01" + GUEST_MAC
    return icmp6(src, dst or solicited_node(target), 135, bytes(4) + target.packed + opts)


class Reply(NamedTuple):
    eth_dst: bytes
    eth_src: bytes
    src: IPv6Address
    dst: IPv6Address
    hop: int
    icmp: bytes


def decode(frame: bytes | None) -> Reply:
    """Split a reply frame with dpkt and check its ICMPv6 checksum with dpkt.in_cksum."""
    assert frame is not None
    eth = dpkt.ethernet.Ethernet(frame)
    assert eth.type == ETH_P_IPV6
    ip = eth.data
    assert isinstance(ip, dpkt.ip6.IP6)
    assert ip.nxt == 58
    raw = bytes(frame[54:])
    assert ip.plen == len(raw)
    pseudo = ip.src + ip.dst + struct.pack("!I", len(raw)) + b"\x00\x00\x00\x3a"
    assert dpkt.in_cksum(pseudo + raw) == 0, "bad ICMPv6 checksum"
    return Reply(eth.dst, eth.src, IPv6Address(ip.src), IPv6Address(ip.dst), ip.hlim, raw)


def ra_options(icmp: bytes) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for o in parse_options(memoryview(icmp[16:])):
        out.setdefault(o.type, []).append(o.data)
    return out


def responder(
    ctx: Context = CTX,
    *,
    start: float | None = None,
    ra_interval_min: float = 30.0,
    ra_interval_max: float = 60.0,
    first_ra_delay: float = 1.0,
    rng: random.Random | None = None,
) -> NdpResponder:
    return NdpResponder(
        ctx,
        start=start,
        ra_interval_min=ra_interval_min,
        ra_interval_max=ra_interval_max,
        first_ra_delay=first_ra_delay,
        rng=rng,
    )


# -- RS -> RA ---------------------------------------------------------------------------------------------


def test_rs_gets_full_ra() -> None:
    reply = decode(responder().handle_icmp6(GUEST_MAC, rs(), 10.0))
    assert (reply.eth_dst, reply.eth_src) == (GUEST_MAC, OUR_MAC)
    assert (reply.src, reply.dst, reply.hop) == (OUR_LL, GUEST_LL, 255)
    typ, code, _sum, cur_hop, flags, lifetime, reachable, retrans = struct.unpack(
        "!BBHBBHII", reply.icmp[:16]
    )
    assert (typ, code) == (134, 0)
    assert cur_hop == 64
    assert flags == 0xC0  # M and O: DHCPv6 runs
    assert lifetime == 9000
    assert (reachable, retrans) == (0, 0)
    opts = ra_options(reply.icmp)
    (prefix,) = opts[3]
    plen, pflags, valid, preferred, _res, pfx = struct.unpack("!BBIII16s", prefix)
    assert (plen, pflags) == (64, 0xC0)  # L and A
    assert (valid, preferred) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert IPv6Address(pfx) == IPv6Address("2001:db8:0:1::")
    assert opts[5] == [b"\x00\x00" + (65520).to_bytes(4, "big")]
    (rdnss,) = opts[25]
    lifetime_dns = struct.unpack("!I", rdnss[2:6])[0]
    assert lifetime_dns >= 3 * 60
    assert [IPv6Address(rdnss[i : i + 16]) for i in range(6, len(rdnss), 16)] == list(DNS)
    (dnssl,) = opts[31]
    assert dnssl[6:].rstrip(b"\x00") == b"\x07example\x03com\x00\x03lan"
    assert opts[1] == [OUR_MAC]


def test_rs_from_unspecified_goes_to_all_nodes() -> None:
    reply = decode(responder().handle_icmp6(GUEST_MAC, rs(UNSPEC, sllao=False), 0.0))
    assert (reply.eth_dst, reply.dst) == (ALL_NODES_MAC, ALL_NODES)


def test_rs_from_unspecified_with_lladdr_is_invalid() -> None:
    with pytest.raises(MalformedFrame, match=r"ndp\.lladdr_from_unspecified"):
        responder().handle_icmp6(GUEST_MAC, rs(UNSPEC, sllao=True), 0.0)


def test_prefix_not_64_is_on_link_only() -> None:
    ctx = dataclasses.replace(CTX, ip6=dataclasses.replace(NET, prefix_len=56))
    opts = ra_options(decode(responder(ctx).handle_icmp6(GUEST_MAC, rs(), 0.0)).icmp)
    (prefix,) = opts[3]
    assert prefix[:2] == bytes((56, 0x80))
    assert IPv6Address(prefix[14:30]) == IPv6Address("2001:db8::")


def test_no_dhcpv6_clears_m_and_o() -> None:
    ctx = dataclasses.replace(CTX, dhcpv6=False)
    reply = decode(responder(ctx).handle_icmp6(GUEST_MAC, rs(), 0.0))
    assert reply.icmp[5] == 0


@pytest.mark.parametrize(
    ("mtu", "present"), [(1279, False), (1280, True), (1500, True), (65535, True), (65536, False)]
)
def test_mtu_option_only_when_it_fits(mtu: int, present: bool) -> None:
    ctx = dataclasses.replace(CTX, mtu=mtu)
    opts = ra_options(decode(responder(ctx).handle_icmp6(GUEST_MAC, rs(), 0.0)).icmp)
    assert (5 in opts) is present
    if present:
        assert opts[5] == [b"\x00\x00" + mtu.to_bytes(4, "big")]


def test_mtu_zero_offers_no_mtu_option() -> None:
    ctx = dataclasses.replace(CTX, assign_mtu=False)
    opts = ra_options(decode(responder(ctx).handle_icmp6(GUEST_MAC, rs(), 0.0)).icmp)
    assert 5 not in opts and 3 in opts


def test_no_dns_no_search_no_dns_options() -> None:
    ctx = dataclasses.replace(CTX, search=(), ip6=dataclasses.replace(NET, dns=()))
    opts = ra_options(decode(responder(ctx).handle_icmp6(GUEST_MAC, rs(), 0.0)).icmp)
    assert 25 not in opts
    assert 31 not in opts
    assert set(opts) == {1, 3, 5}


def test_no_dhcp_dns_and_no_dhcp_search_leave_out_rdnss_and_dnssl() -> None:
    opts = ra_options(
        decode(responder(dataclasses.replace(CTX, dhcp_dns=False)).handle_icmp6(GUEST_MAC, rs(), 0.0)).icmp
    )
    assert 25 not in opts and len(opts[31]) == 1
    opts = ra_options(
        decode(responder(dataclasses.replace(CTX, dhcp_search=False)).handle_icmp6(GUEST_MAC, rs(), 0.0)).icmp
    )
    assert 31 not in opts and len(opts[25]) == 1


def test_ra_disabled_still_answers_ns() -> None:
    r = responder(dataclasses.replace(CTX, ra=False))
    assert r.handle_icmp6(GUEST_MAC, rs(), 0.0) is None
    assert r.handle_icmp6(GUEST_MAC, ns(GATEWAY), 0.0) is not None


def test_ndp_disabled_answers_nothing() -> None:
    r = responder(dataclasses.replace(CTX, ndp=False), start=0.0)
    assert r.handle_icmp6(GUEST_MAC, rs(), 0.0) is None
    assert r.handle_icmp6(GUEST_MAC, ns(GATEWAY), 0.0) is None
    assert r.next_deadline() == float("inf")
    assert r.handle_timer(GUEST_MAC, 1e6) is None


def test_no_ipv6_answers_nothing() -> None:
    r = responder(dataclasses.replace(CTX, ip6=None))
    assert r.handle_icmp6(GUEST_MAC, rs(), 0.0) is None
    assert r.next_deadline() == float("inf")


# -- NS -> NA ---------------------------------------------------------------------------------------------


def na_fields(reply: Reply) -> tuple[int, int, IPv6Address, list[NdpOption]]:
    typ, code, _sum, flags, target = struct.unpack("!BBHI16s", reply.icmp[:24])
    assert (typ, code) == (136, 0)
    return flags, code, IPv6Address(target), list(parse_options(memoryview(reply.icmp[24:])))


@pytest.mark.parametrize(
    "target",
    [GATEWAY, OUR_LL, IPv6Address("2001:db8:0:1::99"), IPv6Address("fe80::1"), IPv6Address("2001:4860::8")],
)
def test_ns_answered_with_our_mac(target: IPv6Address) -> None:
    reply = decode(responder().handle_icmp6(GUEST_MAC, ns(target), 0.0))
    assert (reply.eth_dst, reply.eth_src, reply.dst, reply.hop) == (GUEST_MAC, OUR_MAC, GUEST_LL, 255)
    flags, _code, tgt, opts = na_fields(reply)
    assert flags == 0xE0000000  # Router, Solicited, Override
    assert tgt == target
    assert opts == [NdpOption(2, OUR_MAC)]


def test_ns_for_global_gateway_from_global_source() -> None:
    reply = decode(responder().handle_icmp6(GUEST_MAC, ns(GATEWAY, src=GUEST_ADDR, dst=GATEWAY), 0.0))
    assert reply.dst == GUEST_ADDR
    assert reply.src == GATEWAY  # answered from the address asked about
    assert na_fields(reply)[2] == GATEWAY


def test_unicast_ns_for_guest_own_addresses_not_answered() -> None:
    r = responder()
    slaac = IPv6Address("2001:db8:0:1:" + str(GUEST_LL).split("::")[1])
    for target in (GUEST_ADDR, GUEST_LL, slaac):
        assert r.handle_icmp6(GUEST_MAC, ns(target, src=GUEST_LL), 0.0) is None


@pytest.mark.parametrize(
    "target",
    [GUEST_ADDR, GUEST_LL, IPv6Address("fe80::1234:5678:9abc:def0"), IPv6Address("2001:db8:0:1:abcd::1")],
)
def test_dad_for_guest_addresses_not_answered(target: IPv6Address) -> None:
    assert responder().handle_icmp6(GUEST_MAC, ns(target, src=UNSPEC), 0.0) is None


@pytest.mark.parametrize("target", [OUR_LL, GATEWAY])
def test_dad_for_our_addresses_is_defended(target: IPv6Address) -> None:
    reply = decode(responder().handle_icmp6(GUEST_MAC, ns(target, src=UNSPEC), 0.0))
    assert (reply.eth_dst, reply.dst) == (ALL_NODES_MAC, ALL_NODES)
    flags, _code, tgt, opts = na_fields(reply)
    assert flags == 0xA0000000  # Router, Override; not Solicited
    assert tgt == target
    assert opts == [NdpOption(2, OUR_MAC)]


def test_dad_with_lladdr_is_invalid() -> None:
    body = bytes(4) + OUR_LL.packed + b"\x01\x01" + GUEST_MAC
    with pytest.raises(MalformedFrame, match=r"ndp\.lladdr_from_unspecified"):
        responder().handle_icmp6(GUEST_MAC, icmp6(UNSPEC, solicited_node(OUR_LL), 135, body), 0.0)


def test_bad_hop_limit_and_checksum_are_dropped() -> None:
    with pytest.raises(MalformedFrame, match=r"ndp\.bad_hop_limit"):
        responder().handle_icmp6(GUEST_MAC, rs(hop=64), 0.0)
    good = rs()
    raw = bytearray(struct.pack("!IHBB", 6 << 28, len(good.payload), 58, 255) + good.src + good.dst)
    raw += good.payload
    raw[42] ^= 0xFF
    with pytest.raises(MalformedFrame, match=r"ndp\.bad_checksum"):
        responder().handle_icmp6(GUEST_MAC, parse_ipv6(memoryview(bytes(raw))), 0.0)


def test_malformed_ns_reports_codec_reason() -> None:
    body = bytes(4) + GATEWAY.packed + b"\x01\x00" + bytes(6)
    with pytest.raises(MalformedFrame, match=r"ndp\.bad_option_len"):
        responder().handle_icmp6(GUEST_MAC, icmp6(GUEST_LL, solicited_node(GATEWAY), 135, body), 0.0)


@pytest.mark.parametrize("typ", [1, 128, 129, 134, 136, 137, 143])
def test_other_icmpv6_types_ignored(typ: int) -> None:
    assert responder().handle_icmp6(GUEST_MAC, icmp6(GUEST_LL, OUR_LL, typ, bytes(20)), 0.0) is None


def test_empty_icmpv6_payload_ignored() -> None:
    ip = parse_ipv6(memoryview(struct.pack("!IHBB", 6 << 28, 0, 58, 255) + GUEST_LL.packed + OUR_LL.packed))
    assert responder().handle_icmp6(GUEST_MAC, ip, 0.0) is None


# -- periodic RA ------------------------------------------------------------------------------------------


def test_timer_first_ra_soon_after_start_then_periodic() -> None:
    r = responder(start=100.0, ra_interval_min=40.0, ra_interval_max=40.0)
    assert r.next_deadline() == 101.0
    assert r.handle_timer(GUEST_MAC, 100.5) is None
    reply = decode(r.handle_timer(GUEST_MAC, 101.0))
    assert (reply.eth_dst, reply.src, reply.dst, reply.hop) == (ALL_NODES_MAC, OUR_LL, ALL_NODES, 255)
    assert reply.icmp[0] == 134
    assert ra_options(reply.icmp)[1] == [OUR_MAC]
    # RFC 4861 §6.2.4: the first three advertisements at most 16 s apart, then the configured interval.
    assert r.next_deadline() == 117.0
    assert r.handle_timer(None, 116.9) is None
    assert r.handle_timer(None, 117.0) is not None
    assert r.next_deadline() == 133.0
    assert r.handle_timer(None, 133.5) is not None
    assert r.next_deadline() == 149.5
    assert r.handle_timer(None, 149.5) is not None
    assert r.next_deadline() == 189.5


def test_timer_arms_itself_without_start() -> None:
    r = responder(ra_interval_min=30.0, ra_interval_max=60.0, first_ra_delay=2.0)
    assert r.next_deadline() == 0.0
    assert r.handle_timer(None, 500.0) is None
    assert r.next_deadline() == 502.0
    assert r.handle_timer(None, 502.0) is not None


def test_timer_spreads_within_bounds() -> None:
    r = responder(start=0.0, ra_interval_min=30.0, ra_interval_max=60.0, rng=random.Random(7))
    now = r.next_deadline()
    gaps = []
    for _ in range(20):
        assert r.handle_timer(GUEST_MAC, now) is not None
        gaps.append(r.next_deadline() - now)
        now = r.next_deadline()
    assert all(g <= 16.0 for g in gaps[:3])
    assert all(30.0 <= g <= 60.0 for g in gaps[3:])
    assert len(set(gaps[3:])) > 1


def test_timer_off_when_ra_disabled() -> None:
    r = responder(dataclasses.replace(CTX, ra=False), start=0.0)
    assert r.next_deadline() == float("inf")
    assert r.handle_timer(GUEST_MAC, 1000.0) is None


def test_bad_interval_rejected() -> None:
    with pytest.raises(ValueError, match=r"ra_interval"):
        NdpResponder(CTX, ra_interval_min=60.0, ra_interval_max=30.0)


# -- fuzz -------------------------------------------------------------------------------------------------


@given(
    st.one_of(st.sampled_from([133, 135]), st.integers(0, 255)),
    st.sampled_from([0, 0, 0, 1]),
    st.binary(max_size=120),
    st.sampled_from([GUEST_LL, UNSPEC, GUEST_ADDR]),
    st.sampled_from([255, 255, 64]),
)
def test_fuzz_handle_icmp6(typ: int, code: int, body: bytes, src: IPv6Address, hop: int) -> None:
    """Arbitrary ICMPv6 bodies, checksummed so they reach the parsers: bytes, None or MalformedFrame only."""
    ip = icmp6(src, ALL_NODES, typ, body, code=code, hop=hop)
    try:
        out = responder().handle_icmp6(GUEST_MAC, ip, 0.0)
    except MalformedFrame:
        return
    if out is not None:
        decode(out)


@given(st.binary(min_size=1, max_size=120))
def test_fuzz_handle_icmp6_unchecked(payload: bytes) -> None:
    """Raw bytes with whatever checksum they happen to carry."""
    raw = struct.pack("!IHBB", 6 << 28, len(payload), 58, 255) + GUEST_LL.packed + ALL_NODES.packed + payload
    try:
        out = responder().handle_icmp6(GUEST_MAC, parse_ipv6(memoryview(raw)), 0.0)
    except MalformedFrame:
        return
    assert out is None or isinstance(out, bytes)


def test_fragmented_ndp_is_dropped() -> None:
    """RFC 6980: NDP in fragments is refused (the fragment header is made by hand: dpkt would reorder it)."""
    good = rs()
    frag = bytes((58, 0, 0, 0)) + b"\x00\x00\x00\x01"
    raw = struct.pack("!IHBB", 6 << 28, 8 + len(good.payload), 44, 255) + good.src + good.dst
    ip = parse_ipv6(memoryview(raw + frag + bytes(good.payload)))
    assert ip.fragment
    with pytest.raises(MalformedFrame, match=r"ndp\.fragmented"):
        responder().handle_icmp6(GUEST_MAC, ip, 0.0)
