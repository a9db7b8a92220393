"""UDP flows: one host socket per (guest port, remote address, remote port), replies mapped back.

Guest-initiated flows get their own socket, bound to the guest's source port when the host has it free (so
the remote sees the same port) and connected to the destination, which makes the kernel deliver only that
peer's replies to it. Datagrams arriving on a forwarded host port create host-initiated flows that share the
listening socket; the guest's replies go back out of that same socket with sendto(). The gateway address means
the host's loopback, and DNS sent to a --dns-forward address goes to the host's resolver. A flow is forgotten
after `udp_idle` seconds without traffic either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from passtd.dataplane.core.context import Context
from passtd.dataplane.core.flowtable import PROTO_UDP, Flow, FlowKey, key_addr
from passtd.dataplane.core.icmp import LOOPBACK4, LOOPBACK6, map_target, remote_as_seen
from passtd.dataplane.packets.udp import UdpTemplate, udp_template

DNS_PORT: Final = 53
DNS_TLS_PORT: Final = 853  # RFC 7858; passt's is_dns_flow() relays it too


@dataclass(slots=True, eq=False)
class UdpFlow(Flow):
    v6: bool = False
    guest_addr: bytes = b""
    guest_port: int = 0
    remote_addr: bytes = b""  # as the guest sees it
    remote_port: int = 0
    target_addr: bytes = b""  # where the host socket sends (loopback for the gateway, the resolver for DNS)
    target_port: int = 0
    sock: Any = None  # the shell's socket object; shared with the listener for host-initiated flows
    own_sock: bool = True  # False: the socket is a forwarded port's listener, not ours to close
    sock_addr: Any = None  # the shell's sendto() address for a host-initiated flow (as recvfrom gave it)
    to_guest: UdpTemplate | None = None  # headers toward the guest, built on first use
    no_gso: bool = False  # the shell found the route refuses UDP segmentation offload: send one by one
    # -U: a flow from the namespace's loopback to the host's has no guest frames: the host's replies go back
    # through `back` (the namespace-side listening socket) to `back_addr` (the peer as recvfrom gave it).
    back: Any = None
    back_addr: Any = None


def udp_key(remote: bytes, remote_port: int, guest_port: int) -> FlowKey:
    return (PROTO_UDP, key_addr(remote), remote_port, guest_port)


def target_for(
    ctx: Context,
    dst: bytes,
    dport: int,
    dns_forward: tuple[IPv4Address | IPv6Address, ...],
    dns_upstream: tuple[IPv4Address | IPv6Address, ...],
) -> bytes:
    """Where a guest datagram (or connection) to dst:dport really goes on the host: the DNS relay first (passt
    fwd.c fwd_nat_from_tap), then the address mapping."""
    if dport in (DNS_PORT, DNS_TLS_PORT) and dns_upstream and any(dst == a.packed for a in dns_forward):
        v6 = len(dst) == 16
        same = [a for a in dns_upstream if (a.version == 6) == v6]
        return (same or list(dns_upstream))[0].packed
    return map_target(ctx, dst)


def new_guest_flow(
    flow_id: int, v6: bool, src: bytes, dst: bytes, sport: int, dport: int, target: bytes, now: float
) -> UdpFlow:
    return UdpFlow(
        flow_id, PROTO_UDP, udp_key(dst, dport, sport), now, now, guest_initiated=True, v6=v6,
        guest_addr=bytes(src), guest_port=sport, remote_addr=bytes(dst), remote_port=dport,
        target_addr=target, target_port=dport,
    )  # fmt: skip


def new_host_flow(
    flow_id: int, guest_addr: bytes, guest_port: int, remote: bytes, peer: bytes, peer_port: int, sock: Any,
    now: float,
) -> UdpFlow:  # fmt: skip
    return UdpFlow(
        flow_id, PROTO_UDP, udp_key(remote, peer_port, guest_port), now, now, guest_initiated=False,
        v6=len(guest_addr) == 16, guest_addr=guest_addr, guest_port=guest_port, remote_addr=remote,
        remote_port=peer_port, target_addr=peer, target_port=peer_port, sock=sock, own_sock=False,
    )  # fmt: skip


def guest_template(flow: UdpFlow) -> UdpTemplate:
    """The headers of every datagram toward the guest on this flow: from the address and port it expects."""
    tpl = flow.to_guest
    if tpl is None:
        tpl = flow.to_guest = udp_template(
            flow.remote_addr, flow.guest_addr, flow.remote_port, flow.guest_port
        )
    return tpl


__all__ = ["LOOPBACK4", "LOOPBACK6", "UdpFlow", "remote_as_seen"]
