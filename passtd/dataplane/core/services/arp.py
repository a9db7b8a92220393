"""ARP proxy (RFC 826): answer every request with our MAC, except for the guest's own address.

The guest sees a single router-like peer for every IPv4 address, so all its traffic comes to passtd.
A request for the guest's own address is duplicate-address detection or a gratuitous ARP: answering it
would make the guest believe its address is taken.
"""

from __future__ import annotations

from passtd.dataplane.core.context import Context
from passtd.dataplane.packets.arp import ARP_REPLY, ARP_REQUEST, build_arp, parse_arp
from passtd.dataplane.packets.ethernet import ETH_P_ARP, build_ethernet


def handle_arp(ctx: Context, payload: memoryview) -> bytes | None:
    """Return the reply frame for an ARP request, or None when there is nothing to answer."""
    arp = parse_arp(payload)
    if arp.op != ARP_REQUEST:
        return None
    if arp.tpa == arp.spa:  # gratuitous announcement
        return None
    if arp.spa == b"\x00\x00\x00\x00":  # RFC 5227 probe: only the guest probes, and only for its own address
        return None
    if ctx.ip4 is not None and arp.tpa == ctx.ip4.addr.packed:
        return None
    reply = build_arp(ARP_REPLY, ctx.our_mac, arp.tpa, arp.sha, arp.spa)
    return build_ethernet(arp.sha, ctx.our_mac, ETH_P_ARP, reply)
