"""NDP responder (passt ndp.c): we are the guest's only router and the owner of every other address.

- Router Solicitation → Router Advertisement: prefix (SLAAC only for a /64), MTU, DNS (RDNSS and DNSSL
  unless --no-dhcp-dns / --no-dhcp-search), M/O flags when DHCPv6 runs, source = our link-local address,
  so the guest's default route points at us.
- Neighbor Solicitation → Neighbor Advertisement with our MAC for any target except the guest's own addresses,
  so all the guest's traffic, on-link or not, comes to passtd (the IPv6 twin of the ARP proxy).
- Duplicate address detection (source ::) is answered only for addresses that are ours (our link-local, the
  gateway): every other DAD target is an address the guest is about to take (SLAAC, stable-privacy or
  temporary addresses we cannot predict), and answering would make the guest drop it.
- Unsolicited RAs to all-nodes at a randomised interval (RFC 4861 §6.2.4), the first soon after start; the
  shell asks `next_deadline()` and calls `handle_timer(now)`.

Invalid solicitations (RFC 4861 §6.1.1, §7.1.1: hop limit not 255, bad checksum, fragments, link-layer option
with an unspecified source) raise MalformedFrame so the tap boundary drops and counts them.
"""

from __future__ import annotations

import math
import random
from ipaddress import IPv6Address
from typing import Final

from passtd.dataplane.core.context import Context, link_local_from_mac
from passtd.dataplane.packets.checksum import IPPROTO_ICMPV6, l4_checksum6
from passtd.dataplane.packets.ethernet import ETH_P_IPV6, build_ethernet, ipv6_multicast_mac
from passtd.dataplane.packets.icmp import build_icmp6_packet
from passtd.dataplane.packets.ipv6 import Ip6Header
from passtd.dataplane.packets.ndp import (
    INFINITE_LIFETIME,
    MAX_ROUTER_LIFETIME,
    ND_NEIGHBOR_SOLICIT,
    ND_OPT_SOURCE_LLADDR,
    ND_OPT_TARGET_LLADDR,
    ND_ROUTER_SOLICIT,
    RA_FLAG_MANAGED,
    RA_FLAG_OTHER,
    build_neighbor_advertisement,
    build_option_dnssl,
    build_option_lladdr,
    build_option_mtu,
    build_option_prefix_info,
    build_option_rdnss,
    build_router_advertisement,
    parse_neighbor_solicitation,
    parse_router_solicitation,
)
from passtd.errors import MalformedFrame

ALL_NODES: Final = IPv6Address("ff02::1")
ALL_NODES_MAC: Final = ipv6_multicast_mac(ALL_NODES.packed)
_UNSPECIFIED: Final = bytes(16)
_NDP_HOP_LIMIT: Final = 255  # RFC 4861 §6.1.1, §7.1.1: proves the sender is on-link
_RA_CUR_HOP_LIMIT: Final = 64
_IPV6_MIN_MTU: Final = 1280  # RFC 8200 §5
_MAX_INITIAL_RTR_ADVERTISEMENTS: Final = 3  # RFC 4861 §10
_MAX_INITIAL_RTR_ADVERT_INTERVAL: Final = 16.0  # RFC 4861 §10


def _eui64_address(prefix: IPv6Address, mac: bytes) -> bytes:
    """The SLAAC address a guest forms from a /64 and its MAC (RFC 4862 §5.5.3, RFC 4291 appendix A)."""
    return prefix.packed[:8] + link_local_from_mac(mac).packed[8:]


class NdpResponder:
    """Answers the guest's RS and NS, and advertises us as its router on a timer."""

    def __init__(
        self,
        ctx: Context,
        *,
        ra_interval_min: float = 30.0,
        ra_interval_max: float = 60.0,
        first_ra_delay: float = 1.0,
        start: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`start` is the current time if known; without it the first `handle_timer` call arms the timer."""
        if not 0 < ra_interval_min <= ra_interval_max:
            raise ValueError("need 0 < ra_interval_min <= ra_interval_max")
        self._ctx = ctx
        self._interval_min = ra_interval_min
        self._interval_max = ra_interval_max
        self._first_delay = first_ra_delay
        self._rng = rng if rng is not None else random.Random()
        self._initial_left = _MAX_INITIAL_RTR_ADVERTISEMENTS
        self._ra_enabled = ctx.ndp and ctx.ra and ctx.ip6 is not None
        self._next_ra: float | None = None if start is None else start + first_ra_delay
        # RFC 8106 §5.1: DNS lifetimes of at least 3 * MaxRtrAdvInterval survive two lost RAs.
        self._dns_lifetime = min(math.ceil(3 * ra_interval_max), INFINITE_LIFETIME - 1)
        ip6 = ctx.ip6
        self._ours: frozenset[bytes] = frozenset()
        if ip6 is not None:
            self._ours = frozenset({ip6.our_ll.packed, ip6.gateway.packed}) - {ip6.addr.packed}

    # -- solicitations ---------------------------------------------------------------------------------

    def handle_icmp6(self, guest_mac: bytes, ip6: Ip6Header, now: float) -> bytes | None:
        """Reply frame for an RS or NS from the guest; None for anything else or nothing to say."""
        ctx = self._ctx
        if not ctx.ndp or ctx.ip6 is None:
            return None
        msg = ip6.payload
        if len(msg) == 0 or msg[0] not in (ND_ROUTER_SOLICIT, ND_NEIGHBOR_SOLICIT):
            return None
        if ip6.fragment:  # RFC 6980 §5: fragmented NDP is dropped
            raise MalformedFrame("ndp.fragmented")
        if ip6.hop_limit != _NDP_HOP_LIMIT:
            raise MalformedFrame("ndp.bad_hop_limit")
        if l4_checksum6(ip6.src, ip6.dst, IPPROTO_ICMPV6, msg) != 0:
            raise MalformedFrame("ndp.bad_checksum")
        if msg[0] == ND_ROUTER_SOLICIT:
            return self._on_router_solicitation(guest_mac, ip6)
        return self._on_neighbor_solicitation(guest_mac, ip6)

    def _on_router_solicitation(self, guest_mac: bytes, ip6: Ip6Header) -> bytes | None:
        rs = parse_router_solicitation(ip6.payload)
        unspecified = ip6.src == _UNSPECIFIED
        if unspecified and rs.source_lladdr is not None:  # RFC 4861 §6.1.1
            raise MalformedFrame("ndp.lladdr_from_unspecified")
        if not self._ra_enabled:
            return None
        # RFC 4861 §6.2.6: unicast to a known soliciting address, else all-nodes.
        if unspecified:
            return self._router_advertisement(ALL_NODES.packed, ALL_NODES_MAC)
        return self._router_advertisement(ip6.src, guest_mac)

    def _on_neighbor_solicitation(self, guest_mac: bytes, ip6: Ip6Header) -> bytes | None:
        ns = parse_neighbor_solicitation(ip6.payload)
        dad = ip6.src == _UNSPECIFIED
        if dad and ns.source_lladdr is not None:  # RFC 4861 §7.1.1
            raise MalformedFrame("ndp.lladdr_from_unspecified")
        if dad:
            if ns.target not in self._ours:
                return None
        elif ns.target in self._guest_addresses(guest_mac, ip6.src):
            return None
        ctx = self._ctx
        message = build_neighbor_advertisement(
            ns.target,
            router=True,
            solicited=not dad,  # RFC 4861 §7.2.4: a DAD answer is unsolicited, to all-nodes
            override=True,
            options=(build_option_lladdr(ND_OPT_TARGET_LLADDR, ctx.our_mac),),
        )
        src = ns.target if ns.target in self._ours else self._our_ll
        if dad:
            return self._frame(ALL_NODES_MAC, src, ALL_NODES.packed, message)
        return self._frame(guest_mac, src, ip6.src, message)

    def _guest_addresses(self, guest_mac: bytes, src: bytes) -> set[bytes]:
        ip6 = self._ctx.ip6
        assert ip6 is not None
        addrs = {ip6.addr.packed, link_local_from_mac(guest_mac).packed, src}
        if ip6.prefix_len == 64:
            addrs.add(_eui64_address(ip6.prefix, guest_mac))
        return addrs

    # -- periodic advertisements -----------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When `handle_timer` wants to run next; inf when RAs are off, 0.0 while the timer is not armed."""
        if not self._ra_enabled:
            return math.inf
        if self._next_ra is None:
            return 0.0
        return self._next_ra

    def handle_timer(self, guest_mac: bytes | None, now: float) -> bytes | None:
        """The unsolicited RA when due (to all-nodes, so `guest_mac` is not needed), else None."""
        if not self._ra_enabled:
            return None
        if self._next_ra is None:
            self._next_ra = now + self._first_delay
            return None
        if now < self._next_ra:
            return None
        interval = self._rng.uniform(self._interval_min, self._interval_max)
        if self._initial_left > 0:
            self._initial_left -= 1
            interval = min(interval, _MAX_INITIAL_RTR_ADVERT_INTERVAL)
        self._next_ra = now + interval
        return self._router_advertisement(ALL_NODES.packed, ALL_NODES_MAC)

    # -- builders --------------------------------------------------------------------------------------

    @property
    def _our_ll(self) -> bytes:
        ip6 = self._ctx.ip6
        assert ip6 is not None
        return ip6.our_ll.packed

    def _router_advertisement(self, dst: bytes, eth_dst: bytes) -> bytes:
        ctx = self._ctx
        ip6 = ctx.ip6
        assert ip6 is not None
        options: list[bytes] = []
        if 0 < ip6.prefix_len <= 128:
            options.append(
                build_option_prefix_info(
                    ip6.prefix, ip6.prefix_len, on_link=True, autonomous=ip6.prefix_len == 64
                )
            )
        if ctx.assign_mtu and _IPV6_MIN_MTU <= ctx.mtu <= 0xFFFF:
            options.append(build_option_mtu(ctx.mtu))
        if ip6.dns and ctx.dhcp_dns:
            options.append(build_option_rdnss(ip6.dns, self._dns_lifetime))
        if ctx.search and ctx.dhcp_search:
            options.append(build_option_dnssl(ctx.search, self._dns_lifetime))
        options.append(build_option_lladdr(ND_OPT_SOURCE_LLADDR, ctx.our_mac))
        message = build_router_advertisement(
            cur_hop_limit=_RA_CUR_HOP_LIMIT,
            flags=(RA_FLAG_MANAGED | RA_FLAG_OTHER) if ctx.dhcpv6 else 0,
            router_lifetime=MAX_ROUTER_LIFETIME,
            options=options,
        )
        return self._frame(eth_dst, self._our_ll, dst, message)

    def _frame(self, eth_dst: bytes, src: bytes, dst: bytes, message: bytearray) -> bytes:
        packet = build_icmp6_packet(src, dst, message, hop_limit=_NDP_HOP_LIMIT)
        return build_ethernet(eth_dst, self._ctx.our_mac, ETH_P_IPV6, packet)
