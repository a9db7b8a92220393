"""What passtd is to the guest: our MAC, the guest's addresses, gateway, DNS, MTU, and which services run.

Read-only for the core; built once from the configuration. The guest's MAC is learned from its frames and
kept in `Guest`, the only mutable piece of identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from passtd.dataplane.packets.ethernet import BROADCAST

DEFAULT_MAC = bytes.fromhex("9a559a559a55")


def is_loopback(addr: bytes) -> bool:
    """A packed IPv4 (127.0.0.0/8) or IPv6 (::1) loopback address."""
    return (len(addr) == 4 and addr[0] == 127) or addr == bytes(15) + b"\x01"


def link_local_from_mac(mac: bytes) -> IPv6Address:
    """Modified EUI-64 link-local address (RFC 4291 appendix A)."""
    eui = bytes((mac[0] ^ 0x02,)) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return IPv6Address(b"\xfe\x80" + b"\x00" * 6 + eui)


@dataclass(frozen=True, slots=True)
class Ip4Net:
    addr: IPv4Address  # the guest's address
    prefix_len: int
    gateway: IPv4Address
    dns: tuple[IPv4Address, ...] = ()

    @property
    def netmask(self) -> IPv4Address:
        return IPv4Address((0xFFFFFFFF << (32 - self.prefix_len)) & 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class Ip6Net:
    addr: IPv6Address  # the guest's global address
    prefix_len: int
    gateway: IPv6Address  # what the guest routes through; may be our link-local address
    our_ll: IPv6Address  # source of NDP and DHCPv6 messages
    dns: tuple[IPv6Address, ...] = ()

    @property
    def prefix(self) -> IPv6Address:
        mask = ((1 << 128) - 1) ^ ((1 << (128 - self.prefix_len)) - 1)
        return IPv6Address(int(self.addr) & mask)


@dataclass(frozen=True, slots=True)
class Context:
    our_mac: bytes = DEFAULT_MAC
    mtu: int = 65520
    # -m 0: offer no MTU (no DHCP option 26, no NDP MTU option, the tap keeps its own); `mtu` still sizes
    assign_mtu: bool = True
    ip4: Ip4Net | None = None
    ip6: Ip6Net | None = None
    search: tuple[str, ...] = ()
    dhcp: bool = True
    ndp: bool = True
    dhcpv6: bool = True
    ra: bool = True
    icmp: bool = True
    map_gw: bool = True
    # Contract for the drop-in options (issue 13); options.py fills them, the core honours them.
    tcp: bool = True  # --no-tcp clears it: guest TCP segments are dropped and counted
    udp: bool = True  # --no-udp clears it
    hostname: str = ""  # -H/--hostname: DHCP option 12
    fqdn: str = ""  # --fqdn: DHCP option 81, DHCPv6 option 39
    dhcp_dns: bool = True  # nameservers offered by DHCP, DHCPv6 and RA (--no-dhcp-dns / pasta's --dhcp-dns)
    dhcp_search: bool = True  # search domains offered likewise (--no-dhcp-search / pasta's --dhcp-search)
    # --map-host-loopback: the guest-side address that means the host's loopback (None: not mapped; by default
    # the gateway when map_gw); --map-guest-addr: the guest-side address that means the host's own address.
    map_host_loopback4: IPv4Address | None = None
    map_host_loopback6: IPv6Address | None = None
    map_guest_addr4: IPv4Address | None = None
    map_guest_addr6: IPv6Address | None = None
    # The DNS relay (core/dns.py plan_dns): TCP and UDP to port 53 (or 853) of a `dns_forward` address go to
    # the `dns_upstream` resolver of the same family (`core/udp.py` target_for, for TCP and UDP alike).
    dns_forward: tuple[IPv4Address | IPv6Address, ...] = ()
    dns_upstream: tuple[IPv4Address | IPv6Address, ...] = ()


def host_loopback4(ctx: Context) -> bytes | None:
    """The guest-side IPv4 address that means the host's loopback: --map-host-loopback, else the gateway
    (passt's default), or None with --no-map-gw and no explicit address."""
    if ctx.map_host_loopback4 is not None:
        return ctx.map_host_loopback4.packed
    if ctx.map_gw and ctx.ip4 is not None:
        return ctx.ip4.gateway.packed
    return None


def host_loopback6(ctx: Context) -> bytes | None:
    """The IPv6 twin of `host_loopback4`."""
    if ctx.map_host_loopback6 is not None:
        return ctx.map_host_loopback6.packed
    if ctx.map_gw and ctx.ip6 is not None:
        return ctx.ip6.gateway.packed
    return None


@dataclass(slots=True)
class Guest:
    """What we learned about the guest from its traffic (reported by the control plane)."""

    mac: bytes | None = None
    addrs4: set[IPv4Address] = field(default_factory=set)
    addrs6: set[IPv6Address] = field(default_factory=set)

    @property
    def dst_mac(self) -> bytes:
        """Unicast to the guest once known, broadcast before (passt does the same)."""
        return self.mac if self.mac is not None else BROADCAST
