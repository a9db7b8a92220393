"""Single-lease DHCPv4 server (RFC 2131), after passt's dhcp.c.

There is one guest and one address to give it, so the server keeps no state: every request is answered from
the `Context` alone. The lease is infinite, the server identifier and router are the gateway address, and
replies are broadcast (IPv4 and UDP 67 -> 68) because the guest has no address yet; dhclient and busybox
udhcpc both accept that. Which reply a request gets is one table, `_HANDLERS`:

    DISCOVER                    -> OFFER
    REQUEST for the lease       -> ACK
    REQUEST for another address -> NAK          (RFC 2131 §4.3.2: e.g. an old lease from another network)
    REQUEST naming another server -> nothing     (the client chose someone else)
    INFORM                      -> ACK without yiaddr and lease time (RFC 2131 §4.3.5)
    DECLINE, RELEASE            -> nothing       (there is no other address to move to, nothing to free)
    no message type (BOOTP)     -> BOOTREPLY with the lease (RFC 1534)
    anything else               -> nothing

What a lease carries besides address, mask and router: the MTU, the nameservers and search list (unless
--no-dhcp-dns / --no-dhcp-search), and the guest's name when configured: option 12 (-H/--hostname) as plain
text and option 81 (--fqdn, RFC 4702) with the E flag and the name in wire form, RCODE1/2 = 255 (§2.2), as
passt sends them whether or not the client asked.

A message that does not parse raises `MalformedFrame` for the tap boundary to count, like every codec.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address

from passtd.dataplane.core.context import Context, Ip4Net
from passtd.dataplane.packets.dhcp import (
    BOOTREPLY,
    BOOTREQUEST,
    DHCP_CLIENT_PORT,
    DHCP_MIN_MAX_SIZE,
    DHCP_SERVER_PORT,
    DHCPACK,
    DHCPDECLINE,
    DHCPDISCOVER,
    DHCPINFORM,
    DHCPNAK,
    DHCPOFFER,
    DHCPRELEASE,
    DHCPREQUEST,
    FQDN_FLAG_E,
    FQDN_RCODE_SERVER,
    INFINITE_LEASE,
    OPT_CLIENT_FQDN,
    OPT_DNS,
    OPT_DOMAIN_NAME,
    OPT_DOMAIN_SEARCH,
    OPT_HOSTNAME,
    OPT_LEASE_TIME,
    OPT_MAX_MESSAGE_SIZE,
    OPT_MESSAGE,
    OPT_MESSAGE_TYPE,
    OPT_MTU,
    OPT_PARAM_REQUEST,
    OPT_REQUESTED_IP,
    OPT_ROUTER,
    OPT_SERVER_ID,
    OPT_SUBNET_MASK,
    ZERO_ADDR,
    ClientFqdn,
    DhcpMessage,
    build_dhcp,
    encode_dns_name,
    pack_client_fqdn,
    parse_dhcp,
    unpack_u16,
)
from passtd.dataplane.packets.ethernet import ETH_P_IP, build_ethernet
from passtd.dataplane.packets.udp import UdpHeader, build_udp4
from passtd.errors import MalformedFrame

IPV4_BROADCAST = IPv4Address("255.255.255.255").packed
_IP_UDP_HLEN = 28  # what the client's maximum message size counts on top of the DHCP message
_MTU_MIN = 68  # RFC 2132 §5.1
_MTU_MAX = 65535

_Handler = Callable[[Context, Ip4Net, DhcpMessage], bytes | None]


def handle_dhcp(ctx: Context, guest_mac: bytes, udp: UdpHeader) -> bytes | None:
    """Answer a datagram the guest sent to port 67 with a whole Ethernet frame, or None to stay silent."""
    ip4 = ctx.ip4
    if not ctx.dhcp or ip4 is None or udp.dport != DHCP_SERVER_PORT:
        return None
    req = parse_dhcp(udp.payload)
    if req.op != BOOTREQUEST:
        return None
    raw_type = req.options.get(OPT_MESSAGE_TYPE)
    if raw_type is None:
        handler: _Handler | None = _on_bootp
    else:
        handler = _HANDLERS.get(raw_type[0]) if len(raw_type) == 1 else None
    if handler is None:
        return None
    payload = handler(ctx, ip4, req)
    if payload is None:
        return None
    datagram = build_udp4(ip4.gateway.packed, IPV4_BROADCAST, DHCP_SERVER_PORT, DHCP_CLIENT_PORT, payload)
    return build_ethernet(guest_mac, ctx.our_mac, ETH_P_IP, datagram)


def _on_discover(ctx: Context, ip4: Ip4Net, req: DhcpMessage) -> bytes:
    return _lease_reply(ctx, ip4, req, DHCPOFFER)


def _on_request(ctx: Context, ip4: Ip4Net, req: DhcpMessage) -> bytes | None:
    """RFC 2131 §4.3.2: SELECTING/INIT-REBOOT name the address in option 50, RENEWING/REBINDING in ciaddr."""
    server_id = req.options.get(OPT_SERVER_ID)
    if server_id is not None and server_id != ip4.gateway.packed:
        return None
    wanted = req.options.get(OPT_REQUESTED_IP)
    if wanted is None and req.ciaddr != ZERO_ADDR:
        wanted = req.ciaddr
    if wanted is not None and wanted != ip4.addr.packed:
        return _nak(ip4, req)
    return _lease_reply(ctx, ip4, req, DHCPACK)


def _on_inform(ctx: Context, ip4: Ip4Net, req: DhcpMessage) -> bytes:
    """RFC 2131 §4.3.5: configuration only; no yiaddr and no lease time."""
    return _lease_reply(ctx, ip4, req, DHCPACK, lease=False)


def _on_bootp(ctx: Context, ip4: Ip4Net, req: DhcpMessage) -> bytes:
    """RFC 1534 §2: a BOOTP client gets the address for good, with the same parameters, minus DHCP's own."""
    return _lease_reply(ctx, ip4, req, None)


def _ignore(ctx: Context, ip4: Ip4Net, req: DhcpMessage) -> None:
    return None


_HANDLERS: dict[int, _Handler] = {
    DHCPDISCOVER: _on_discover,
    DHCPREQUEST: _on_request,
    DHCPINFORM: _on_inform,
    DHCPDECLINE: _ignore,
    DHCPRELEASE: _ignore,
}


def _reply_header(
    req: DhcpMessage, options: dict[int, bytes], *, yiaddr: bytes, ciaddr: bytes
) -> DhcpMessage:
    """RFC 2131 §4.3.1 table 3: xid, flags, giaddr and chaddr come from the client; siaddr stays 0."""
    return DhcpMessage(
        op=BOOTREPLY,
        xid=req.xid,
        chaddr=req.chaddr,
        options=options,
        htype=req.htype,
        hlen=req.hlen,
        flags=req.flags,
        ciaddr=ciaddr,
        yiaddr=yiaddr,
        giaddr=req.giaddr,
    )


def _nak(ip4: Ip4Net, req: DhcpMessage) -> bytes:
    options = {
        OPT_MESSAGE_TYPE: bytes((DHCPNAK,)),
        OPT_SERVER_ID: ip4.gateway.packed,
        OPT_MESSAGE: b"requested address is not available",
    }
    return build_dhcp(_reply_header(req, options, yiaddr=ZERO_ADDR, ciaddr=ZERO_ADDR))


def _search_names(search: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """Names that encode (RFC 1035 §2.3.4 limits), with their wire form; the rest are skipped."""
    names: list[tuple[str, bytes]] = []
    for name in search:
        try:
            names.append((name.rstrip("."), encode_dns_name(name)))
        except ValueError:
            continue
    return names


def _name_options(ctx: Context) -> dict[int, bytes]:
    """Options 12 and 81 for the configured names; a name that cannot be encoded is left out."""
    out: dict[int, bytes] = {}
    hostname = ctx.hostname.encode("ascii", "replace")
    if 0 < len(hostname) <= 255:  # RFC 2132 §3.14: at least one octet
        out[OPT_HOSTNAME] = hostname
    if ctx.fqdn:
        try:
            value = pack_client_fqdn(ClientFqdn(FQDN_FLAG_E, FQDN_RCODE_SERVER, FQDN_RCODE_SERVER, ctx.fqdn))
        except ValueError:
            return out
        if len(value) <= 255:
            out[OPT_CLIENT_FQDN] = value
    return out


def _max_message_size(ctx: Context, req: DhcpMessage) -> int:
    """Largest DHCP message the client takes: option 57 (RFC 2132 §9.10), never below 576, within the MTU."""
    size = DHCP_MIN_MAX_SIZE
    raw = req.options.get(OPT_MAX_MESSAGE_SIZE)
    if raw is not None:
        try:
            size = max(size, unpack_u16(raw))
        except MalformedFrame:
            pass
    if ctx.mtu >= DHCP_MIN_MAX_SIZE:
        size = min(size, ctx.mtu)
    return size - _IP_UDP_HLEN


def _order(options: dict[int, bytes], requested: bytes) -> dict[int, bytes]:
    """RFC 2131 §4.3.1: parameters in the order the client asked for them, the others after."""
    first = {code: options[code] for code in requested if code in options}
    return first | {code: value for code, value in options.items() if code not in first}


def _lease_reply(
    ctx: Context, ip4: Ip4Net, req: DhcpMessage, msg_type: int | None, *, lease: bool = True
) -> bytes:
    """OFFER/ACK (or a BOOTP reply when `msg_type` is None) carrying the lease and the network parameters.

    If the message would exceed what the client accepts, we drop search domains (but the first), then DNS
    servers (but the first), then the search option, then options 81 and 12, until it fits; address, mask,
    router, domain name stay.
    """
    head: dict[int, bytes] = {}
    if msg_type is not None:
        head[OPT_MESSAGE_TYPE] = bytes((msg_type,))
        head[OPT_SERVER_ID] = ip4.gateway.packed
        if lease:
            head[OPT_LEASE_TIME] = INFINITE_LEASE.to_bytes(4, "big")
    names = _search_names(ctx.search) if ctx.dhcp_search else []
    dns = list(ip4.dns) if ctx.dhcp_dns else []
    fixed = {OPT_SUBNET_MASK: ip4.netmask.packed, OPT_ROUTER: ip4.gateway.packed}
    if names:
        fixed[OPT_DOMAIN_NAME] = names[0][0].encode("ascii")
    if ctx.assign_mtu and _MTU_MIN <= ctx.mtu <= _MTU_MAX:
        fixed[OPT_MTU] = ctx.mtu.to_bytes(2, "big")
    fixed.update(_name_options(ctx))
    requested = req.options.get(OPT_PARAM_REQUEST, b"")
    limit = _max_message_size(ctx, req)
    yiaddr = ip4.addr.packed if lease else ZERO_ADDR
    ciaddr = req.ciaddr if msg_type == DHCPACK else ZERO_ADDR
    while True:
        params = dict(fixed)
        if dns:
            params[OPT_DNS] = b"".join(a.packed for a in dns)
        if names:
            params[OPT_DOMAIN_SEARCH] = b"".join(wire for _, wire in names)
        message = build_dhcp(
            _reply_header(req, head | _order(params, requested), yiaddr=yiaddr, ciaddr=ciaddr)
        )
        # With no search list, one DNS server and no names the message is at most 539 bytes, so it fits 576.
        if len(message) <= limit:
            return message
        if names or dns[1:]:
            if len(names) > 1 or not dns[1:]:
                names.pop()
            else:
                dns.pop()
        elif OPT_CLIENT_FQDN in fixed:
            del fixed[OPT_CLIENT_FQDN]
        elif OPT_HOSTNAME in fixed:
            del fixed[OPT_HOSTNAME]
        else:
            return message
