"""Neighbor Discovery (RFC 4861) messages: parse what a guest solicits, build what a router answers.

Only the two solicitations a guest sends to its router are parsed (RS, NS); only the two answers are built
(RA, NA). Messages are ICMPv6 bodies starting at the type byte; builders return them with a zero checksum,
for `build_icmp6_packet` to fill in over the pseudo-header.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from ipaddress import IPv6Address
from typing import Final, NamedTuple

from passtd.dataplane.packets.dhcp import encode_dns_name
from passtd.errors import MalformedFrame

# RFC 4861 §4: ICMPv6 types.
ND_ROUTER_SOLICIT: Final = 133
ND_ROUTER_ADVERT: Final = 134
ND_NEIGHBOR_SOLICIT: Final = 135
ND_NEIGHBOR_ADVERT: Final = 136

# RFC 4861 §4.6, RFC 8106 §5: option types.
ND_OPT_SOURCE_LLADDR: Final = 1
ND_OPT_TARGET_LLADDR: Final = 2
ND_OPT_PREFIX_INFO: Final = 3
ND_OPT_MTU: Final = 5
ND_OPT_RDNSS: Final = 25
ND_OPT_DNSSL: Final = 31

# RFC 4861 §4.2 RA flags byte, §4.4 NA flags word, §4.6.2 prefix flags byte.
RA_FLAG_MANAGED: Final = 0x80
RA_FLAG_OTHER: Final = 0x40
NA_FLAG_ROUTER: Final = 0x80000000
NA_FLAG_SOLICITED: Final = 0x40000000
NA_FLAG_OVERRIDE: Final = 0x20000000
PREFIX_FLAG_ON_LINK: Final = 0x80
PREFIX_FLAG_AUTONOMOUS: Final = 0x40

INFINITE_LIFETIME: Final = 0xFFFFFFFF
MAX_ROUTER_LIFETIME: Final = 9000  # RFC 4861 §6.2.1 AdvDefaultLifetime upper bound

RS_HLEN: Final = 8
NS_HLEN: Final = 24
_OPT_UNIT: Final = 8
_MAX_OPT_UNITS: Final = 255

_ICMP_PREFIX = struct.Struct("!BBH")  # type, code, checksum
_RA = struct.Struct(
    "!BBHBBHII"
)  # type, code, csum, cur hop limit, flags, router lifetime, reachable, retrans
_NA = struct.Struct("!BBHI16s")  # type, code, csum, R/S/O flags + reserved, target
_PREFIX_INFO = struct.Struct(
    "!BBBBIII16s"
)  # type, len, prefix len, flags, valid, preferred, reserved, prefix
_MTU_OPT = struct.Struct("!BBHI")
_DNS_OPT_HDR = struct.Struct("!BBHI")  # RFC 8106 §5.1/§5.2: type, len, reserved, lifetime


class NdpOption(NamedTuple):
    type: int
    data: bytes  # option body after the 2-byte type/length header


class RouterSolicitation(NamedTuple):
    options: tuple[NdpOption, ...]

    @property
    def source_lladdr(self) -> bytes | None:
        return _lladdr(self.options, ND_OPT_SOURCE_LLADDR)


class NeighborSolicitation(NamedTuple):
    target: bytes  # 16 bytes
    options: tuple[NdpOption, ...]

    @property
    def source_lladdr(self) -> bytes | None:
        return _lladdr(self.options, ND_OPT_SOURCE_LLADDR)


def _lladdr(options: tuple[NdpOption, ...], opt_type: int) -> bytes | None:
    """RFC 4861 §4.6.1 for Ethernet (RFC 2464 §6): the first six bytes of the option body."""
    for opt in options:
        if opt.type == opt_type and len(opt.data) >= 6:
            return opt.data[:6]
    return None


def parse_options(buf: memoryview) -> tuple[NdpOption, ...]:
    """RFC 4861 §4.6: walk type/length options; a zero length or an option past the end voids the message."""
    options: list[NdpOption] = []
    off = 0
    end = len(buf)
    while off < end:
        if off + 2 > end:
            raise MalformedFrame("ndp.option_past_end")
        length = buf[off + 1] * _OPT_UNIT
        if length == 0:
            raise MalformedFrame("ndp.bad_option_len")
        if off + length > end:
            raise MalformedFrame("ndp.option_past_end")
        options.append(NdpOption(buf[off], bytes(buf[off + 2 : off + length])))
        off += length
    return tuple(options)


def _check_header(message: memoryview, expected_type: int, min_len: int) -> None:
    if len(message) < min_len:
        raise MalformedFrame("ndp.truncated")
    typ, code, _csum = _ICMP_PREFIX.unpack_from(message)
    if typ != expected_type:
        raise MalformedFrame("ndp.bad_type")
    if code != 0:  # RFC 4861 §6.1.1, §7.1.1
        raise MalformedFrame("ndp.bad_code")


def parse_router_solicitation(message: memoryview) -> RouterSolicitation:
    """RFC 4861 §4.1: type, code, checksum, 4 reserved bytes, then options."""
    _check_header(message, ND_ROUTER_SOLICIT, RS_HLEN)
    return RouterSolicitation(parse_options(message[RS_HLEN:]))


def parse_neighbor_solicitation(message: memoryview) -> NeighborSolicitation:
    """RFC 4861 §4.3: type, code, checksum, 4 reserved bytes, target address, then options."""
    _check_header(message, ND_NEIGHBOR_SOLICIT, NS_HLEN)
    target = bytes(message[8:NS_HLEN])
    if target[0] == 0xFF:  # §7.1.1: the target must not be a multicast address
        raise MalformedFrame("ndp.multicast_target")
    return NeighborSolicitation(target, parse_options(message[NS_HLEN:]))


def build_router_advertisement(
    *,
    cur_hop_limit: int,
    flags: int,
    router_lifetime: int,
    reachable_time: int = 0,
    retrans_timer: int = 0,
    options: Iterable[bytes] = (),
) -> bytearray:
    """RFC 4861 §4.2 Router Advertisement with a zero checksum; `flags` takes RA_FLAG_* bits."""
    msg = bytearray(
        _RA.pack(ND_ROUTER_ADVERT, 0, 0, cur_hop_limit, flags, router_lifetime, reachable_time, retrans_timer)
    )
    for opt in options:
        msg += opt
    return msg


def build_neighbor_advertisement(
    target: bytes, *, router: bool, solicited: bool, override: bool, options: Iterable[bytes] = ()
) -> bytearray:
    """RFC 4861 §4.4 Neighbor Advertisement with a zero checksum."""
    flags = (
        (NA_FLAG_ROUTER if router else 0)
        | (NA_FLAG_SOLICITED if solicited else 0)
        | (NA_FLAG_OVERRIDE if override else 0)
    )
    msg = bytearray(_NA.pack(ND_NEIGHBOR_ADVERT, 0, 0, flags, target))
    for opt in options:
        msg += opt
    return msg


def build_option_lladdr(opt_type: int, mac: bytes) -> bytes:
    """RFC 4861 §4.6.1 Source/Target Link-layer Address option for a 6-byte Ethernet address (RFC 2464 §6)."""
    return bytes((opt_type, 1)) + mac


def build_option_prefix_info(
    prefix: IPv6Address,
    prefix_len: int,
    *,
    on_link: bool,
    autonomous: bool,
    valid_lifetime: int = INFINITE_LIFETIME,
    preferred_lifetime: int = INFINITE_LIFETIME,
) -> bytes:
    """RFC 4861 §4.6.2 Prefix Information: L marks the prefix on-link, A allows SLAAC (RFC 4862 §5.5.3)."""
    flags = (PREFIX_FLAG_ON_LINK if on_link else 0) | (PREFIX_FLAG_AUTONOMOUS if autonomous else 0)
    return _PREFIX_INFO.pack(
        ND_OPT_PREFIX_INFO, 4, prefix_len, flags, valid_lifetime, preferred_lifetime, 0, prefix.packed
    )


def build_option_mtu(mtu: int) -> bytes:
    """RFC 4861 §4.6.4 MTU option."""
    return _MTU_OPT.pack(ND_OPT_MTU, 1, 0, mtu)


def build_option_rdnss(servers: Sequence[IPv6Address], lifetime: int) -> bytes:
    """RFC 8106 §5.1 Recursive DNS Server option; at most 127 addresses fit the 8-bit length."""
    addrs = b"".join(a.packed for a in servers[:127])
    return _DNS_OPT_HDR.pack(ND_OPT_RDNSS, 1 + len(addrs) // _OPT_UNIT, 0, lifetime) + addrs


def build_option_dnssl(names: Sequence[str], lifetime: int) -> bytes:
    """RFC 8106 §5.2 DNS Search List option: RFC 1035 names, zero-padded to 8 bytes.

    Names that cannot be encoded, or that would overflow the option, are left out rather than failing the RA;
    with no name left the result is empty (§5.2 requires at least one name).
    """
    body = bytearray()
    for name in names:
        try:
            wire = encode_dns_name(name)
        except ValueError:
            continue
        if _DNS_OPT_HDR.size + len(body) + len(wire) > _MAX_OPT_UNITS * _OPT_UNIT:
            break
        body += wire
    if not body:
        return b""
    body += bytes(-len(body) % _OPT_UNIT)
    return _DNS_OPT_HDR.pack(ND_OPT_DNSSL, 1 + len(body) // _OPT_UNIT, 0, lifetime) + body
