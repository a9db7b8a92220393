"""UDP flow decisions: where a guest datagram goes, how host peers appear, how replies are built."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import dpkt

from passtd.dataplane.core.context import Context
from passtd.dataplane.core.udp import guest_template, new_guest_flow, remote_as_seen, target_for
from passtd.dataplane.packets.udp import udp_headers
from tests.helpers.tcpfake import CTX, FAR4, GUEST4, GW4

LOOP4 = bytes((127, 0, 0, 1))
DNS_FWD = (IPv4Address("10.77.0.99"), IPv6Address("fd77::99"))
UPSTREAM = (IPv4Address("127.0.0.53"), IPv6Address("::1"))


def test_targets() -> None:
    assert target_for(CTX, GW4, 9999, (), ()) == LOOP4
    assert target_for(CTX, FAR4, 9999, (), ()) == FAR4
    assert target_for(Context(ip4=CTX.ip4, map_gw=False), GW4, 1, (), ()) == GW4
    fwd4 = DNS_FWD[0].packed
    assert target_for(CTX, fwd4, 53, DNS_FWD, UPSTREAM) == UPSTREAM[0].packed
    assert target_for(CTX, DNS_FWD[1].packed, 53, DNS_FWD, UPSTREAM) == UPSTREAM[1].packed
    assert (
        target_for(CTX, fwd4, 53, DNS_FWD, (IPv6Address("::1"),)) == IPv6Address("::1").packed
    )  # other family
    assert target_for(CTX, fwd4, 54, DNS_FWD, UPSTREAM) == fwd4  # only port 53 is DNS
    assert target_for(CTX, fwd4, 53, DNS_FWD, ()) == fwd4  # no resolver known: left alone


def test_host_peers_as_seen_by_the_guest() -> None:
    assert remote_as_seen(CTX, LOOP4) == GW4
    assert remote_as_seen(CTX, bytes(15) + b"\x01") == IPv6Address("fd77::2").packed
    assert remote_as_seen(CTX, FAR4) == FAR4
    # --no-map-gw: a loopback source still cannot reach the guest as it is; passt shows it as the gateway.
    assert remote_as_seen(Context(ip4=CTX.ip4, map_gw=False), LOOP4) == CTX.ip4.gateway.packed


def test_reply_to_guest_comes_from_the_address_it_asked() -> None:
    flow = new_guest_flow(1, False, GUEST4, DNS_FWD[0].packed, 40000, 53, UPSTREAM[0].packed, 0.0)
    tpl = guest_template(flow)
    ip = dpkt.ip.IP(udp_headers(tpl, b"answer") + b"answer")
    assert not tpl.v6
    assert (ip.src, ip.dst, ip.data.sport, ip.data.dport, ip.data.data) == (
        DNS_FWD[0].packed, GUEST4, 53, 40000, b"answer",
    )  # fmt: skip
    assert guest_template(flow) is tpl  # made once per flow (counters: tests/io/test_udp_io.py)
