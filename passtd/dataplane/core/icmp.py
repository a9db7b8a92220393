"""ICMP and ICMPv6 echo through the host's ping sockets.

A ping socket (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6) lets an unprivileged process send echo requests; the kernel
rewrites the identifier to the socket's own "port" and delivers only replies that match it. So each
(guest echo id, remote address) pair gets its own socket, and replies are mapped back to the guest's id. A
flow expires after `ECHO_TIMEOUT` seconds without requests, as in passt.

The same id toward the same address from another guest source address takes the key over: the previous
flow is handed back in the action (`replaced`) so the shell closes its socket at once. Echo flows count
against the ICMP flow cap; one beyond it is refused (`FlowTableFull`, counted by the caller).

Echo to the gateway address goes to the host's loopback (unless --no-map-gw): a ping of the gateway must
never leave the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from passtd.dataplane.core.context import Context
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
    """Destination for the host socket: the gateway (and our link-local) mean the host itself."""
    if not ctx.map_gw:
        return dst
    if len(dst) == 4:
        if ctx.ip4 is not None and dst == ctx.ip4.gateway.packed:
            return LOOPBACK4
    elif ctx.ip6 is not None and (dst == ctx.ip6.gateway.packed or dst == ctx.ip6.our_ll.packed):
        return LOOPBACK6
    return dst


def remote_as_seen(ctx: Context, peer: bytes) -> bytes:
    """A host-side peer as the guest sees it: the host itself (its loopback, or the address the guest
    shares with it) appears as the gateway, unless --no-map-gw."""
    if not ctx.map_gw:
        return peer
    if len(peer) == 4:
        if ctx.ip4 is not None and (peer[0] == 127 or peer == ctx.ip4.addr.packed):
            return ctx.ip4.gateway.packed
    elif ctx.ip6 is not None and (peer == LOOPBACK6 or peer == ctx.ip6.addr.packed):
        return ctx.ip6.gateway.packed
    return peer


def echo_from_guest(
    ctx: Context, table: FlowTable, v6: bool, src: bytes, dst: bytes, message: memoryview, now: float
) -> EchoToHost | None:
    """Find or create the flow for a guest echo request; None for other ICMP types (dropped by the caller)."""
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
