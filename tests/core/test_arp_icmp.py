"""ARP proxy and ICMP echo flow logic, pure request → reply."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import dpkt
import pytest

from passtd.dataplane.core.context import Context, Ip4Net, Ip6Net, link_local_from_mac
from passtd.dataplane.core.flowtable import PROTO_ICMP, PROTO_TCP, FlowTable, FlowTableFull, key_addr
from passtd.dataplane.core.icmp import LOOPBACK4, LOOPBACK6, echo_from_guest, echo_to_guest, expired
from passtd.dataplane.core.limits import FdPool, plan_fd_pool
from passtd.dataplane.core.services.arp import handle_arp
from passtd.dataplane.packets.arp import ARP_REPLY, ARP_REQUEST, build_arp
from passtd.dataplane.packets.icmp import ICMP_ECHO_REPLY, ICMPV6_ECHO_REPLY, build_echo

GUEST_MAC = bytes.fromhex("020000000001")
GW = IPv4Address("10.77.0.2").packed
CTX = Context(
    ip4=Ip4Net(IPv4Address("10.77.0.1"), 24, IPv4Address("10.77.0.2")),
    ip6=Ip6Net(
        IPv6Address("fd77::1"), 64, IPv6Address("fd77::2"), link_local_from_mac(bytes.fromhex("9a559a559a55"))
    ),
)


def arp_request(spa: str, tpa: str) -> memoryview:
    return memoryview(
        build_arp(ARP_REQUEST, GUEST_MAC, IPv4Address(spa).packed, bytes(6), IPv4Address(tpa).packed)
    )


def test_link_local_from_mac_is_modified_eui64() -> None:
    assert link_local_from_mac(bytes.fromhex("9a559a559a55")) == IPv6Address("fe80::9855:9aff:fe55:9a55")


def test_arp_answers_any_address_with_our_mac() -> None:
    for target in ("10.77.0.2", "10.77.0.200", "192.0.2.99"):
        frame = handle_arp(CTX, arp_request("10.77.0.1", target))
        assert frame is not None
        eth = dpkt.ethernet.Ethernet(frame)
        assert eth.dst == GUEST_MAC and eth.src == CTX.our_mac
        arp = eth.data
        assert arp.op == ARP_REPLY and arp.sha == CTX.our_mac and arp.spa == IPv4Address(target).packed
        assert arp.tha == GUEST_MAC and arp.tpa == IPv4Address("10.77.0.1").packed


def test_arp_never_claims_the_guests_address() -> None:
    assert handle_arp(CTX, arp_request("10.77.0.9", "10.77.0.1")) is None  # someone asking for the guest
    assert handle_arp(CTX, arp_request("0.0.0.0", "10.77.0.1")) is None  # RFC 5227 probe
    assert handle_arp(CTX, arp_request("10.77.0.5", "10.77.0.5")) is None  # gratuitous
    reply = build_arp(ARP_REPLY, GUEST_MAC, bytes(4), bytes(6), bytes(4))
    assert handle_arp(CTX, memoryview(reply)) is None


def test_echo_flow_maps_gateway_to_loopback_and_restores_ident() -> None:
    table = FlowTable()
    guest, gw = IPv4Address("10.77.0.1").packed, IPv4Address("10.77.0.2").packed
    msg = memoryview(bytes(build_echo(8, 0x1234, 1, b"data")))
    action = echo_from_guest(CTX, table, False, guest, gw, msg, now=0.0)
    assert action is not None and action.new
    assert action.flow.target_addr == LOOPBACK4
    again = echo_from_guest(CTX, table, False, guest, gw, msg, now=1.0)
    assert again is not None and not again.new and again.flow is action.flow
    # The kernel rewrote the identifier to the socket's port; the guest gets its own back.
    frame = echo_to_guest(
        CTX, GUEST_MAC, action.flow, bytes(build_echo(ICMP_ECHO_REPLY, 999, 1, b"data")), 1.5
    )
    assert frame is not None
    ip = dpkt.ethernet.Ethernet(frame).data
    assert ip.src == gw and ip.dst == guest
    assert ip.data.data.id == 0x1234 and ip.data.data.data == b"data"
    assert dpkt.dpkt.in_cksum(bytes(ip.data)) == 0
    assert expired(table, 50.0) == []
    assert expired(table, 62.0) == [action.flow]


def test_echo_flow_other_destinations_and_v6() -> None:
    table = FlowTable()
    guest6 = IPv6Address("fd77::1").packed
    for dst, target in ((IPv6Address("fd77::2"), LOOPBACK6), (CTX.ip6.our_ll, LOOPBACK6),  # type: ignore[union-attr]
                        (IPv6Address("fd88::1"), IPv6Address("fd88::1").packed)):  # fmt: skip
        action = echo_from_guest(
            CTX, table, True, guest6, dst.packed, memoryview(bytes(build_echo(128, 7, 1, b""))), 0
        )
        assert action is not None and action.flow.target_addr == target
    flow = action.flow
    frame = echo_to_guest(CTX, GUEST_MAC, flow, bytes(build_echo(ICMPV6_ECHO_REPLY, 1, 1, b"x")), 0.1)
    assert frame is not None
    ip6 = dpkt.ethernet.Ethernet(frame).data
    assert ip6.data.type == ICMPV6_ECHO_REPLY
    # Not an echo request: not a flow.
    assert (
        echo_from_guest(
            CTX, table, True, guest6, dst.packed, memoryview(bytes(build_echo(129, 7, 1, b""))), 0
        )
        is None
    )
    no_map = Context(ip4=CTX.ip4, map_gw=False)
    gw = IPv4Address("10.77.0.2").packed
    a = echo_from_guest(
        no_map, FlowTable(), False, bytes(4), gw, memoryview(bytes(build_echo(8, 1, 1, b""))), 0
    )
    assert a is not None and a.flow.target_addr == gw


def test_flow_table_bound_and_ids() -> None:
    table = FlowTable(max_flows=1)
    guest = IPv4Address("10.77.0.1").packed
    action = echo_from_guest(CTX, table, False, guest, guest, memoryview(bytes(build_echo(8, 1, 1, b""))), 0)
    assert action is not None
    assert table.by_id(action.flow.flow_id) is action.flow
    assert table.get((1, key_addr(guest), 0, 1)) is action.flow
    try:
        echo_from_guest(CTX, table, False, guest, guest, memoryview(bytes(build_echo(8, 2, 1, b""))), 0)
    except FlowTableFull:
        pass
    else:
        raise AssertionError("flow table bound not enforced")
    table.remove(action.flow)
    assert len(table) == 0 and table.new_id() > action.flow.flow_id


def test_flow_table_caps_per_protocol_and_descriptors() -> None:
    """Each cap refuses with its own name, counted; a removal gives the room back."""
    pool = FdPool(open_files=1024, reserved=64, total=64, floor=16)
    table = FlowTable(pool=pool)
    assert (table.cap(PROTO_TCP), table.cap(17), table.cap(PROTO_ICMP)) == (64, 32, 4)  # shares of the room
    pool.listeners = 32
    assert (table.cap(PROTO_TCP), table.cap(17), table.cap(PROTO_ICMP)) == (32, 16, 2)  # listeners took half
    guest = IPv4Address("10.77.0.1").packed
    echo = [
        echo_from_guest(CTX, table, False, guest, guest, memoryview(bytes(build_echo(8, i, 1, b""))), 0)
        for i in range(2)
    ]
    with pytest.raises(FlowTableFull) as refused:
        echo_from_guest(CTX, table, False, guest, guest, memoryview(bytes(build_echo(8, 9, 1, b""))), 0)
    assert refused.value.reason == "limit.icmp_flows"
    assert table.refused == {"limit.icmp_flows": 1} and table.count(PROTO_ICMP) == 2 and table.fds == 2
    assert pool.flows == 2
    assert echo[0] is not None
    table.remove(echo[0].flow)
    table.remove(echo[0].flow)  # twice: counted once
    assert table.count(PROTO_ICMP) == 1 and table.fds == pool.flows == 1 and len(table) == 1
    pool.listeners = pool.total - 2
    assert table.check(PROTO_TCP, 2) == "limit.fds"
    assert table.check(PROTO_TCP, 1) == ""
    table.max_flows = 1
    assert table.check(PROTO_TCP) == "limit.flows"
    assert table.refused == {"limit.icmp_flows": 1, "limit.fds": 1, "limit.flows": 1}


def test_fd_pool_follows_a_limit_lowered_at_run_time() -> None:
    """prlimit --pid on a running daemon: the caps shrink to the new limit, what is held stays counted."""
    pool = plan_fd_pool(20000, 24)
    table = FlowTable(pool=pool)
    before = table.cap(17)
    pool.replan(300)
    assert (pool.open_files, pool.reserved, pool.total) == (300, 64, 300 - 24 - 64)
    assert table.cap(17) == pool.total // 2 < before  # UDP still gets at most half: TCP keeps the rest
    assert table.cap(PROTO_TCP) > table.cap(17)
    pool.replan(20000)
    assert table.cap(17) == before


def test_fd_pool_keeps_room_for_tcp_and_the_control_socket() -> None:
    pool = plan_fd_pool(20000, 40)
    assert pool.reserved == 128 and pool.total == 20000 - 40 - 128
    assert pool.listener_room() == pool.total - 256  # `-t all`: every port but the flows' floor
    table = FlowTable(pool=pool)
    assert table.cap(PROTO_TCP) >= 10000  # ten thousand connections at the sandbox's hard limit
    assert table.cap(PROTO_TCP) - table.cap(17) - table.cap(PROTO_ICMP) >= pool.total * 3 // 8
    small = plan_fd_pool(100, 90)
    assert (
        small.total == 0
        and small.listener_room() == 0
        and FlowTable(pool=small).check(17) == "limit.udp_flows"
    )


def test_an_echo_id_reused_from_another_source_hands_the_old_flow_back() -> None:
    """Same id, same remote, another guest source: the new flow takes the key, the old one is returned for
    the shell to close its socket (it used to be dropped from the table with its socket still open)."""
    table = FlowTable()
    a, b = IPv4Address("10.77.0.1").packed, IPv4Address("10.77.0.9").packed
    msg = memoryview(bytes(build_echo(8, 7, 1, b"")))
    first = echo_from_guest(CTX, table, False, a, GW, msg, 0)
    assert first is not None and first.replaced is None and first.new
    same = echo_from_guest(CTX, table, False, a, GW, msg, 1)
    assert same is not None and same.flow is first.flow and same.replaced is None and not same.new
    other = echo_from_guest(CTX, table, False, b, GW, msg, 2)
    assert other is not None and other.replaced is first.flow and other.new
    assert len(table) == 1 and table.by_id(first.flow.flow_id) is None
    table.set_cap(PROTO_ICMP, 0)  # even with no room at all a takeover is one flow for another
    back = echo_from_guest(CTX, table, False, a, GW, msg, 3)
    assert back is not None and back.replaced is other.flow
    assert len(table) == 1 == table.count(PROTO_ICMP) and table.get(other.flow.key) is back.flow
