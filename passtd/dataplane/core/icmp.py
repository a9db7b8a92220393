"""ICMP and ICMPv6 echo through the host's ping sockets.

A ping socket (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6) lets an unprivileged process send echo requests; the kernel
rewrites the identifier to the socket's own "port" and delivers only replies that match it. So each
(guest echo id, remote address) pair gets its own socket, and replies are mapped back to the guest's id. A
flow expires after `ECHO_TIMEOUT` seconds without requests, as in passt.

The same id toward the same address from another guest source address takes the key over: the previous
flow is handed back in the action (`replaced`) so the shell closes its socket at once. Echo flows count
against the ICMP flow cap; one beyond it is refused (`FlowTableFull`, counted by the caller).

Addresses are mapped as for TCP and UDP (`map_target`, `remote_as_seen`, after passt's fwd.c): echo to the
--map-host-loopback address (the gateway by default) goes to the host's loopback, so a ping of the gateway
never leaves the host; echo to the --map-guest-addr address goes to the host's own address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from passtd.dataplane.core.context import Context, host_loopback4, host_loopback6
from passtd.dataplane.core.egress import Egress
from passtd.dataplane.core.flowtable import PROTO_ICMP, Flow, FlowTable, key_addr
from passtd.dataplane.packets.ethernet import ETH_P_IP, ETH_P_IPV6, build_ethernet
from passtd.dataplane.packets.icmp import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    build_echo,
    build_icmp4_packet,
    build_icmp6_packet,
    parse_icmp,
)

ECHO_TIMEOUT: Final = 60.0
LOOPBACK4: Final = bytes((127, 0, 0, 1))
LOOPBACK6: Final = bytes(15) + b"\x01"
_ANY4: Final = bytes(4)
_ANY6: Final = bytes(16)


@dataclass(slots=True, eq=False)
class EchoFlow(Flow):
    """guest_addr is where replies go, guest_port the guest's echo identifier, remote_addr what the guest
    pinged (the source of the replies it sees); the echo socket is the shell's, shared, so no host socket."""

    v6: bool = False


@dataclass(frozen=True, slots=True)
class EchoToHost:
    """Action: send `message` (an echo request, checksum left to the kernel) on the flow's ping socket."""

    flow: EchoFlow
    message: bytes
    new: bool
    replaced: EchoFlow | None = None  # the flow this one took the key from: its socket is to be closed


def map_target(ctx: Context, dst: bytes) -> bytes:
    """Guest-side destination -> host-side one (passt fwd.c nat_outbound): the --map-host-loopback address
    (the gateway by default; on IPv6 our link-local too, unless --no-map-gw) means the host's loopback, the
    --map-guest-addr address means the host's own address, the guest's (both are the same by default)."""
    if len(dst) == 4:
        net4 = ctx.ip4
        if net4 is None:
            return dst
        if dst == host_loopback4(ctx):
            return LOOPBACK4
        guest4 = ctx.map_guest_addr4
        if guest4 is not None and dst == guest4.packed:
            return net4.addr.packed
        return dst
    net6 = ctx.ip6
    if net6 is None:
        return dst
    if dst == host_loopback6(ctx) or (ctx.map_gw and dst == net6.our_ll.packed):
        return LOOPBACK6
    guest6 = ctx.map_guest_addr6
    if guest6 is not None and dst == guest6.packed:
        return net6.addr.packed
    return dst


def remote_as_seen(ctx: Context, peer: bytes) -> bytes:
    """A host-side peer as the guest sees it (passt fwd.c nat_inbound), the inverse of `map_target`.

    127.0.0.1 / ::1 appear as the --map-host-loopback address; the host's own address (the guest's) as the
    --map-guest-addr address. Sources the guest cannot tell apart from itself or cannot route back to (other
    loopback addresses, unmapped ones, the unspecified address) appear as the gateway (on IPv6 with
    --no-map-gw: our link-local address, as passt does). Everything else is left alone.
    """
    if len(peer) == 4:
        net4 = ctx.ip4
        if net4 is None:
            return peer
        if peer[0] == 127:
            alias4 = host_loopback4(ctx)
            return alias4 if alias4 is not None and peer == LOOPBACK4 else net4.gateway.packed
        if peer == net4.addr.packed:
            guest4 = ctx.map_guest_addr4
            return guest4.packed if guest4 is not None else net4.gateway.packed
        if peer == _ANY4:
            return net4.gateway.packed
        return peer
    net6 = ctx.ip6
    if net6 is None:
        return peer
    fallback = net6.gateway.packed if ctx.map_gw else net6.our_ll.packed
    if peer == LOOPBACK6:
        alias6 = host_loopback6(ctx)
        return alias6 if alias6 is not None else fallback
    if peer == net6.addr.packed:
        guest6 = ctx.map_guest_addr6
        return guest6.packed if guest6 is not None else fallback
    if peer == _ANY6:
        return fallback
    return peer


EGRESS_DENIED_ICMP: Final = "egress.icmp"  # echo_from_guest's answer when the egress rules deny a new flow


def echo_from_guest(
    ctx: Context, table: FlowTable, v6: bool, src: bytes, dst: bytes, message: memoryview, now: float,
    egress: Egress | None = None,
) -> EchoToHost | str | None:  # fmt: skip
    """Find or create the flow for a guest echo request; None for other ICMP types (dropped by the caller);
    EGRESS_DENIED_ICMP when `egress` denies a new flow (the request is dropped: no answer at all)."""
    icmp = parse_icmp(message)
    if icmp.type != (ICMPV6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST) or icmp.code != 0:
        return None
    key = (PROTO_ICMP, key_addr(dst), 0, icmp.ident)
    found = table.get(key)
    new = False
    replaced: EchoFlow | None = None
    if isinstance(found, EchoFlow) and found.guest_addr == src:
        flow = found
    else:
        if (
            egress is not None
            and egress.policy is not None
            and not egress.check(PROTO_ICMP, v6, src, icmp.ident, dst, 0, now)
        ):
            return EGRESS_DENIED_ICMP
        flow = EchoFlow(
            table.new_id(), PROTO_ICMP, key, now, now,
            v6=v6, guest_addr=bytes(src), remote_addr=bytes(dst),
            target_addr=map_target(ctx, bytes(dst)), guest_port=icmp.ident,
        )  # fmt: skip
        if found is not None:  # a takeover: one flow for another, never refused
            table.replace(found, flow)
            replaced = found if isinstance(found, EchoFlow) else None
        else:
            table.add(flow)  # FlowTableFull at a cap: the caller counts it
        new = True
    flow.last_active = now
    flow.packets_from_guest += 1
    flow.bytes_from_guest += len(message)
    return EchoToHost(flow, bytes(build_echo(icmp.type, icmp.ident, icmp.seq, icmp.body)), new, replaced)


def echo_to_guest(ctx: Context, guest_mac: bytes, flow: EchoFlow, message: bytes, now: float) -> bytes | None:
    """Frame for a reply read from the flow's ping socket, with the guest's identifier restored."""
    icmp = parse_icmp(memoryview(message))
    if icmp.type != (ICMPV6_ECHO_REPLY if flow.v6 else ICMP_ECHO_REPLY):
        return None
    reply = build_echo(icmp.type, flow.guest_port, icmp.seq, icmp.body)
    flow.last_active = now
    flow.packets_to_guest += 1
    flow.bytes_to_guest += len(reply)
    if flow.v6:
        packet = build_icmp6_packet(flow.remote_addr, flow.guest_addr, reply, hop_limit=64)
        return build_ethernet(guest_mac, ctx.our_mac, ETH_P_IPV6, packet)
    packet = build_icmp4_packet(flow.remote_addr, flow.guest_addr, reply)
    return build_ethernet(guest_mac, ctx.our_mac, ETH_P_IP, packet)


def expired(table: FlowTable, now: float, timeout: float = ECHO_TIMEOUT) -> list[EchoFlow]:
    """Echo flows idle for longer than `timeout`; the caller closes their sockets and removes them."""
    return [f for f in table if isinstance(f, EchoFlow) and now - f.last_active > timeout]
