"""DHCPv6 server for the one guest address (passt dhcpv6.c), stateless apart from the guest's own requests.

Every client gets the same answer: ctx.ip6.addr in its first IA_NA with infinite lifetimes, T1 = T2 =
infinity (RFC 8415 §7.7: never renew), plus DNS servers and search list. The address is a /128; the on-link
prefix and the default route come from our Router Advertisements.

Which messages must or must not carry our Server Identifier follows RFC 8415 §16; messages that break those
rules are ignored, as the RFC asks. Addresses other than ours that a client asks to keep are returned with
zero lifetimes (§18.3.4), so it drops them; extra IA_NA, IA_TA and IA_PD get a NoAddrsAvail or
NoPrefixAvail status.

Nameservers and search list follow --no-dhcp-dns / --no-dhcp-search. With --fqdn every Advertise and Reply
that carries configuration also carries option 39 (RFC 4704): the name, flags 0, or O when the client asked
us to do its AAAA update (S), since we update no DNS: what passt's dhcpv6.c sends.
"""

from __future__ import annotations

from typing import Final

from passtd.dataplane.core.context import Context, Ip6Net
from passtd.dataplane.packets.dhcpv6 import (
    DHCPV6_SERVER_PORT,
    FQDN_FLAG_O,
    FQDN_FLAG_S,
    INFINITY,
    MSG_ADVERTISE,
    MSG_CONFIRM,
    MSG_DECLINE,
    MSG_INFORMATION_REQUEST,
    MSG_REBIND,
    MSG_RELEASE,
    MSG_RENEW,
    MSG_REPLY,
    MSG_REQUEST,
    MSG_SOLICIT,
    OPT_CLIENT_FQDN,
    OPT_CLIENTID,
    OPT_IA_NA,
    OPT_IA_PD,
    OPT_IA_TA,
    OPT_IAADDR,
    OPT_PREFERENCE,
    OPT_RAPID_COMMIT,
    OPT_SERVERID,
    STATUS_NO_ADDRS_AVAIL,
    STATUS_NO_PREFIX_AVAIL,
    STATUS_NOT_ON_LINK,
    STATUS_SUCCESS,
    Dhcpv6Message,
    build_client_fqdn,
    build_dhcpv6,
    build_dns_servers,
    build_domain_list,
    build_duid_ll,
    build_ia,
    build_ia_address,
    build_option,
    build_status_code,
    parse_dhcpv6,
    parse_ia,
    parse_ia_address,
)
from passtd.dataplane.packets.ethernet import ETH_P_IPV6, build_ethernet
from passtd.dataplane.packets.ipv6 import Ip6Header
from passtd.dataplane.packets.udp import UdpHeader, build_udp6

_HANDLED: Final = frozenset(
    {
        MSG_SOLICIT,
        MSG_REQUEST,
        MSG_CONFIRM,
        MSG_RENEW,
        MSG_REBIND,
        MSG_RELEASE,
        MSG_DECLINE,
        MSG_INFORMATION_REQUEST,
    }
)
# RFC 8415 §16: Server Identifier must be absent / must be ours / may be absent but if present must be ours.
_NO_SERVER_ID: Final = frozenset({MSG_SOLICIT, MSG_CONFIRM, MSG_REBIND})
_OUR_SERVER_ID: Final = frozenset({MSG_REQUEST, MSG_RENEW, MSG_RELEASE, MSG_DECLINE})
_IA_CODES: Final = (OPT_IA_NA, OPT_IA_TA, OPT_IA_PD)
_MIN_DUID_LEN: Final = 2
_MAX_DUID_LEN: Final = 130  # RFC 8415 §11.1: 2-byte type + at most 128 bytes
_PREFERENCE_MAX: Final = b"\xff"  # RFC 8415 §18.2.1: the client may stop collecting Advertises at once


def handle_dhcpv6(ctx: Context, guest_mac: bytes, ip6: Ip6Header, udp: UdpHeader) -> bytes | None:
    """Reply frame for a client message to port 547, or None when there is nothing to answer."""
    net = ctx.ip6
    if not ctx.dhcpv6 or net is None or udp.dport != DHCPV6_SERVER_PORT:
        return None
    payload = udp.payload
    if len(payload) == 0 or payload[0] not in _HANDLED:
        return None
    if ip6.src == bytes(16) or ip6.src[0] == 0xFF:  # no address to answer to
        return None
    msg = parse_dhcpv6(payload)
    client_id = msg.get(OPT_CLIENTID)
    if client_id is None or not _MIN_DUID_LEN <= len(client_id) <= _MAX_DUID_LEN:
        return None
    server_duid = build_duid_ll(ctx.our_mac)
    server_id = msg.get(OPT_SERVERID)
    kind = msg.msg_type
    if kind in _NO_SERVER_ID:
        if server_id is not None:
            return None
    elif kind in _OUR_SERVER_ID:
        if server_id != server_duid:
            return None
    elif server_id is not None and server_id != server_duid:  # Information-request, §16.12
        return None

    options = [build_option(OPT_SERVERID, server_duid), build_option(OPT_CLIENTID, client_id)]
    reply_type = MSG_REPLY
    if kind == MSG_SOLICIT:
        if msg.get(OPT_RAPID_COMMIT) is not None:  # RFC 8415 §18.3.1: commit at once, say so in the Reply
            options.append(build_option(OPT_RAPID_COMMIT, b""))
        else:
            reply_type = MSG_ADVERTISE
            options.append(build_option(OPT_PREFERENCE, _PREFERENCE_MAX))
        options += _ia_options(msg, net, release_others=False)
        options += _dns_options(ctx, net, msg)
    elif kind in (MSG_REQUEST, MSG_RENEW, MSG_REBIND):
        options += _ia_options(msg, net, release_others=True)
        options += _dns_options(ctx, net, msg)
    elif kind == MSG_CONFIRM:
        status = _confirm_status(msg, net)
        if status is None:  # §18.3.3: no addresses to confirm, no Reply
            return None
        options.append(build_status_code(status))
    elif kind == MSG_INFORMATION_REQUEST:
        if any(msg.get(code) is not None for code in _IA_CODES):  # §16.12
            return None
        options += _dns_options(ctx, net, msg)
    else:  # Release, Decline: nothing to free or mark, the address is the guest's anyway (§18.3.7-8)
        options.append(build_status_code(STATUS_SUCCESS))

    reply = build_dhcpv6(reply_type, msg.xid, options)
    packet = build_udp6(net.our_ll.packed, ip6.src, DHCPV6_SERVER_PORT, udp.sport, reply)
    return build_ethernet(guest_mac, ctx.our_mac, ETH_P_IPV6, packet)


def _ia_options(msg: Dhcpv6Message, net: Ip6Net, *, release_others: bool) -> list[bytes]:
    """One IA per IA the client sent, same IAID; our address goes into the first IA_NA only."""
    out: list[bytes] = []
    assigned = False
    for opt in msg.options:
        if opt.code not in _IA_CODES:
            continue
        ia = parse_ia(opt.code, opt.data)
        if opt.code == OPT_IA_NA and not assigned:
            assigned = True
            inner = [build_ia_address(net.addr, INFINITY, INFINITY)]
            if release_others:
                for sub in ia.options:
                    if sub.code == OPT_IAADDR:
                        other = parse_ia_address(sub.data).addr
                        if other != net.addr:
                            inner.append(build_ia_address(other, 0, 0))
            out.append(build_ia(OPT_IA_NA, ia.iaid, INFINITY, INFINITY, inner))
        elif opt.code == OPT_IA_PD:
            out.append(build_ia(OPT_IA_PD, ia.iaid, 0, 0, [build_status_code(STATUS_NO_PREFIX_AVAIL)]))
        else:
            out.append(build_ia(opt.code, ia.iaid, 0, 0, [build_status_code(STATUS_NO_ADDRS_AVAIL)]))
    return out


def _confirm_status(msg: Dhcpv6Message, net: Ip6Net) -> int | None:
    """RFC 8415 §18.3.3: Success if every address is the one we lease, NotOnLink otherwise, None if none."""
    addrs = [
        parse_ia_address(sub.data).addr
        for opt in msg.options
        if opt.code in (OPT_IA_NA, OPT_IA_TA)
        for sub in parse_ia(opt.code, opt.data).options
        if sub.code == OPT_IAADDR
    ]
    if not addrs:
        return None
    return STATUS_SUCCESS if all(a == net.addr for a in addrs) else STATUS_NOT_ON_LINK


def _dns_options(ctx: Context, net: Ip6Net, msg: Dhcpv6Message) -> list[bytes]:
    """RFC 3646 DNS servers and search list when we have any and may send them; RFC 4704 client FQDN."""
    out: list[bytes] = []
    if net.dns and ctx.dhcp_dns:
        out.append(build_dns_servers(net.dns))
    if ctx.search and ctx.dhcp_search:
        domains = build_domain_list(ctx.search)
        if domains:
            out.append(domains)
    if ctx.fqdn:
        flags = 0
        asked = msg.get(OPT_CLIENT_FQDN)
        if asked and asked[0] & FQDN_FLAG_S:  # RFC 4704 §5.2; only the flags matter to us
            flags = FQDN_FLAG_O
        try:
            out.append(build_client_fqdn(flags, ctx.fqdn))
        except ValueError:
            pass
    return out
