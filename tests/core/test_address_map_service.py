"""Address mapping (passt fwd.c nat_outbound / nat_inbound): --map-host-loopback, --map-guest-addr,
--no-map-gw, as pure functions, and through TCP, UDP and ICMP echo flows both ways."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.core.context import Context, Ip4Net, Ip6Net, host_loopback4, host_loopback6
from passtd.dataplane.core.flowtable import FlowTable
from passtd.dataplane.core.icmp import LOOPBACK4, LOOPBACK6, echo_from_guest, map_target, remote_as_seen
from passtd.dataplane.core.udp import target_for
from passtd.dataplane.packets.icmp import build_echo

ADDR4, GW4 = IPv4Address("192.0.2.10"), IPv4Address("192.0.2.1")
ADDR6, GW6 = IPv6Address("2001:db8::10"), IPv6Address("2001:db8::1")
OUR_LL = IPv6Address("fe80::9855:9aff:fe55:9a55")
HOST_LO4, HOST_LO6 = IPv4Address("169.254.1.3"), IPv6Address("2001:db8:ffff::3")
GUEST_ALIAS4, GUEST_ALIAS6 = IPv4Address("169.254.1.2"), IPv6Address("2001:db8:ffff::2")
FAR4, FAR6 = IPv4Address("203.0.113.7").packed, IPv6Address("2001:db8:77::7").packed
BASE = Context(
    ip4=Ip4Net(ADDR4, 24, GW4),
    ip6=Ip6Net(ADDR6, 64, GW6, OUR_LL),
)
EXPLICIT = dataclasses.replace(
    BASE,
    map_host_loopback4=HOST_LO4,
    map_host_loopback6=HOST_LO6,
    map_guest_addr4=GUEST_ALIAS4,
    map_guest_addr6=GUEST_ALIAS6,
)
# Podman's pasta line: --no-map-gw --map-guest-addr 169.254.1.2
PODMAN = dataclasses.replace(BASE, map_gw=False, map_guest_addr4=GUEST_ALIAS4)


def test_default_is_todays_gateway_mapping() -> None:
    """No explicit address, map_gw: the gateway (and our link-local) mean the host's loopback."""
    assert host_loopback4(BASE) == GW4.packed and host_loopback6(BASE) == GW6.packed
    assert map_target(BASE, GW4.packed) == LOOPBACK4
    assert map_target(BASE, GW6.packed) == map_target(BASE, OUR_LL.packed) == LOOPBACK6
    assert map_target(BASE, ADDR4.packed) == ADDR4.packed  # no --map-guest-addr: left alone
    assert map_target(BASE, FAR4) == FAR4 and map_target(BASE, FAR6) == FAR6
    assert remote_as_seen(BASE, LOOPBACK4) == GW4.packed
    assert remote_as_seen(BASE, bytes((127, 0, 0, 53))) == GW4.packed
    assert remote_as_seen(BASE, ADDR4.packed) == GW4.packed  # the host's own address, shared with the guest
    assert remote_as_seen(BASE, LOOPBACK6) == remote_as_seen(BASE, ADDR6.packed) == GW6.packed
    assert remote_as_seen(BASE, FAR4) == FAR4 and remote_as_seen(BASE, FAR6) == FAR6


def test_explicit_addresses_both_ways() -> None:
    assert host_loopback4(EXPLICIT) == HOST_LO4.packed and host_loopback6(EXPLICIT) == HOST_LO6.packed
    # guest -> host
    assert map_target(EXPLICIT, HOST_LO4.packed) == LOOPBACK4
    assert map_target(EXPLICIT, HOST_LO6.packed) == LOOPBACK6
    assert map_target(EXPLICIT, GUEST_ALIAS4.packed) == ADDR4.packed
    assert map_target(EXPLICIT, GUEST_ALIAS6.packed) == ADDR6.packed
    assert map_target(EXPLICIT, GW4.packed) == GW4.packed  # the gateway is just the gateway now
    assert map_target(EXPLICIT, OUR_LL.packed) == LOOPBACK6  # our link-local still means us (map_gw)
    # host -> guest: exactly 127.0.0.1 / ::1 appear as the loopback alias, the host's address as its alias
    assert remote_as_seen(EXPLICIT, LOOPBACK4) == HOST_LO4.packed
    assert remote_as_seen(EXPLICIT, LOOPBACK6) == HOST_LO6.packed
    assert remote_as_seen(EXPLICIT, bytes((127, 0, 0, 2))) == GW4.packed  # not mapped: the gateway
    assert remote_as_seen(EXPLICIT, ADDR4.packed) == GUEST_ALIAS4.packed
    assert remote_as_seen(EXPLICIT, ADDR6.packed) == GUEST_ALIAS6.packed


def test_no_map_gw_with_map_guest_addr_as_podman_runs_it() -> None:
    assert host_loopback4(PODMAN) is None and host_loopback6(PODMAN) is None
    assert map_target(PODMAN, GW4.packed) == GW4.packed
    assert map_target(PODMAN, OUR_LL.packed) == OUR_LL.packed
    assert map_target(PODMAN, GUEST_ALIAS4.packed) == ADDR4.packed
    # Loopback sources cannot be shown as they are: the gateway (IPv4) or our link-local (IPv6), as passt.
    assert remote_as_seen(PODMAN, LOOPBACK4) == GW4.packed
    assert remote_as_seen(PODMAN, LOOPBACK6) == OUR_LL.packed
    assert remote_as_seen(PODMAN, ADDR6.packed) == OUR_LL.packed
    assert remote_as_seen(PODMAN, bytes(16)) == OUR_LL.packed
    assert remote_as_seen(PODMAN, bytes(4)) == GW4.packed
    assert remote_as_seen(PODMAN, ADDR4.packed) == GUEST_ALIAS4.packed


def test_explicit_loopback_alias_wins_over_no_map_gw() -> None:
    """--map-host-loopback ADDR works without the gateway default (passt: the option sets the address)."""
    ctx = dataclasses.replace(BASE, map_gw=False, map_host_loopback4=HOST_LO4)
    assert map_target(ctx, HOST_LO4.packed) == LOOPBACK4 and map_target(ctx, GW4.packed) == GW4.packed
    assert remote_as_seen(ctx, LOOPBACK4) == HOST_LO4.packed


def test_family_disabled_leaves_addresses_alone() -> None:
    ctx = Context(map_host_loopback4=HOST_LO4, map_guest_addr6=GUEST_ALIAS6)
    assert map_target(ctx, HOST_LO4.packed) == HOST_LO4.packed
    assert map_target(ctx, GUEST_ALIAS6.packed) == GUEST_ALIAS6.packed
    assert remote_as_seen(ctx, LOOPBACK4) == LOOPBACK4 and remote_as_seen(ctx, LOOPBACK6) == LOOPBACK6


@pytest.mark.parametrize("ctx", [BASE, EXPLICIT, PODMAN], ids=["default", "explicit", "podman"])
@given(addr=st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)))
def test_round_trip_guest_alias_and_never_loopback_to_the_guest(ctx: Context, addr: bytes) -> None:
    """What the guest sees never is a loopback address, and a mapped destination maps back to itself."""
    seen = remote_as_seen(ctx, addr)
    assert len(seen) == len(addr)
    assert seen[:1] != b"\x7f" if len(seen) == 4 else seen != LOOPBACK6
    target = map_target(ctx, addr)
    if target != addr and target not in (LOOPBACK4, LOOPBACK6):  # a --map-guest-addr hit
        assert remote_as_seen(ctx, target) == addr


def test_udp_and_icmp_flows_use_the_mapping() -> None:
    """UDP's target (DNS relay first, then the mapping) and an echo flow's host-side target."""
    assert target_for(EXPLICIT, HOST_LO4.packed, 9999) == LOOPBACK4
    assert target_for(EXPLICIT, GUEST_ALIAS6.packed, 9999) == ADDR6.packed
    echo = memoryview(bytes(build_echo(8, 7, 1, b"ping")))
    action = echo_from_guest(EXPLICIT, FlowTable(), False, ADDR4.packed, GUEST_ALIAS4.packed, echo, 0.0)
    assert action is not None
    assert (action.flow.remote_addr, action.flow.target_addr) == (GUEST_ALIAS4.packed, ADDR4.packed)
    echo6 = memoryview(bytes(build_echo(128, 7, 1, b"ping")))
    action = echo_from_guest(EXPLICIT, FlowTable(), True, ADDR6.packed, HOST_LO6.packed, echo6, 0.0)
    assert action is not None and action.flow.target_addr == LOOPBACK6


def test_tcp_both_directions_with_explicit_mapping() -> None:
    """TCP through the handler: a guest SYN to the aliases targets loopback / the host's address; a peer on
    127.0.0.1 or on the host's address reaches the guest from the aliases."""
    from tests.helpers.tcpfake import CTX as TCP_CTX
    from tests.helpers.tcpfake import GUEST4, FakeSock, Rig

    lo_alias, guest_alias = IPv4Address("192.0.2.200"), IPv4Address("192.0.2.201")
    ctx = dataclasses.replace(TCP_CTX, map_host_loopback4=lo_alias, map_guest_addr4=guest_alias)
    rig = Rig(ctx)
    rig.guest(0x02, 1000, dst=lo_alias.packed, sport=40001)
    rig.guest(0x02, 2000, dst=guest_alias.packed, sport=40002)
    targets = {c.guest_port: (c.remote_addr, c.target_addr) for c in rig.flows if hasattr(c, "target_addr")}
    assert targets[40001] == (lo_alias.packed, LOOPBACK4)
    assert targets[40002] == (guest_alias.packed, GUEST4)  # the guest's address is the host's (tcpfake)
    rig.take()
    for peer, seen in ((LOOPBACK4, lo_alias.packed), (GUEST4, guest_alias.packed)):
        conn = rig.handler.accepted(FakeSock(), peer, 33333, 8080, 0.0)
        assert conn is not None and conn.remote_addr == seen and conn.target_addr == peer
        (syn,) = rig.take()
        assert syn.src == seen and syn.tcp.sport == 33333
