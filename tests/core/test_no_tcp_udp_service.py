"""--no-tcp / --no-udp at the demux: the guest's segments and datagrams are dropped and counted, on the fast
and the general path alike; DHCP and DHCPv6 still answer."""

from __future__ import annotations

import dataclasses
from typing import Any

import dpkt

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.demux import Demux
from passtd.dataplane.core.flowtable import FlowTable
from passtd.dataplane.core.services.ndp import NdpResponder
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.packets.ethernet import BROADCAST, ETH_P_IP, ETH_P_IPV6, build_ethernet
from passtd.dataplane.packets.tcp import SYN, SegmentBuilder, syn_options
from passtd.dataplane.packets.udp import build_udp4, build_udp6
from tests.helpers.tcpfake import CTX, GUEST4, GW4

GUEST6 = bytes.fromhex("fd770000000000000000000000000010")
GW6 = CTX.ip6.gateway.packed if CTX.ip6 is not None else b""
MAC = bytes.fromhex("9a0000000001")


def frames() -> dict[str, bytes]:
    tcp4 = SegmentBuilder(GUEST4, GW4, 40000, 80).build(1, 0, SYN, 999, b"", b"")
    tcp6 = SegmentBuilder(GUEST6, GW6, 40000, 80).build(1, 0, SYN, 999, b"", syn_options(1400, 7))
    dhcp = bytes(dpkt.dhcp.DHCP(chaddr=MAC, xid=7, opts=((dpkt.dhcp.DHCP_OPT_MSGTYPE, b"\x01"),)))
    return {
        "tcp4": build_ethernet(bytes(6), MAC, ETH_P_IP, tcp4),
        "tcp6": build_ethernet(bytes(6), MAC, ETH_P_IPV6, tcp6),  # a SYN with options: the general path
        "udp4": build_ethernet(bytes(6), MAC, ETH_P_IP, build_udp4(GUEST4, GW4, 5000, 53, b"q")),
        "udp6": build_ethernet(bytes(6), MAC, ETH_P_IPV6, build_udp6(GUEST6, GW6, 5000, 53, b"q")),
        "dhcp": build_ethernet(BROADCAST, MAC, ETH_P_IP, build_udp4(bytes(4), b"\xff" * 4, 68, 67, dhcp)),
    }


def run(ctx: Context, frame: bytes, general: bool) -> tuple[list[Any], dict[str, int], int]:
    calls: list[Any] = []
    stats = Stats()
    demux = Demux(
        ctx, Guest(), stats, FlowTable(), NdpResponder(ctx),
        lambda *a: calls.append(("tcp", a[0])), lambda *a: calls.append(("udp", a[0])),
    )  # fmt: skip
    out: list[bytes] = []
    (demux.handle_general if general else demux.handle_frame)(memoryview(frame), 0.0, out, [])
    return calls, dict(stats.dropped), len(out)


def test_no_tcp_drops_and_counts_tcp_only() -> None:
    ctx = dataclasses.replace(CTX, tcp=False)
    f = frames()
    for general in (False, True):
        assert run(ctx, f["tcp4"], general) == ([], {"tcp.disabled": 1}, 0)
        assert run(ctx, f["tcp6"], general) == ([], {"tcp.disabled": 1}, 0)
        assert run(ctx, f["udp4"], general)[0] == [("udp", False)]
    assert run(CTX, f["tcp4"], False)[0] == [("tcp", False)]  # on by default


def test_no_udp_drops_and_counts_udp_but_dhcp_answers() -> None:
    ctx = dataclasses.replace(CTX, udp=False)
    f = frames()
    for general in (False, True):
        assert run(ctx, f["udp4"], general) == ([], {"udp.disabled": 1}, 0)
        assert run(ctx, f["udp6"], general) == ([], {"udp.disabled": 1}, 0)
        assert run(ctx, f["tcp4"], general)[0] == [("tcp", False)]
        assert run(ctx, f["dhcp"], general) == ([], {}, 1)  # the DHCP server still answers
