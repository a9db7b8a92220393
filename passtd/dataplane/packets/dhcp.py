"""DHCPv4 / BOOTP messages (RFC 2131 §2, §3) and the options we use (RFC 2132, RFC 3397, RFC 3396, RFC 4702).

The fixed BOOTP header is 236 bytes, then the magic cookie and the options. Options are kept as raw bytes in
a `dict[int, bytes]` in order of first appearance; repeated instances of one code are concatenated, which is
what RFC 3396 asks for (long options such as the domain search list are split that way). The option table
maps a code to a name and to pack/unpack functions for the few options the server reads or writes.
Option overload (52, payload in `sname`/`file`) is not followed: our server never needs those options.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, Final, NamedTuple

from passtd.errors import MalformedFrame

BOOTREQUEST: Final = 1
BOOTREPLY: Final = 2
HTYPE_ETHER: Final = 1
DHCP_SERVER_PORT: Final = 67
DHCP_CLIENT_PORT: Final = 68
MAGIC_COOKIE: Final = 0x63825363
BROADCAST_FLAG: Final = 0x8000
BOOTP_HLEN: Final = 236  # fixed part, before the magic cookie (RFC 2131 §2, figure 1)
DHCP_OPTIONS_OFFSET: Final = BOOTP_HLEN + 4
BOOTP_MIN_LEN: Final = 300  # RFC 951 vend field of 64 bytes; some clients drop anything shorter
DHCP_MIN_MAX_SIZE: Final = 576  # RFC 2131 §2: every client accepts a 576-byte IP datagram
INFINITE_LEASE: Final = 0xFFFFFFFF

# Message types (RFC 2132 §9.6).
DHCPDISCOVER: Final = 1
DHCPOFFER: Final = 2
DHCPREQUEST: Final = 3
DHCPDECLINE: Final = 4
DHCPACK: Final = 5
DHCPNAK: Final = 6
DHCPRELEASE: Final = 7
DHCPINFORM: Final = 8

# Option codes (RFC 2132 unless noted).
OPT_PAD: Final = 0
OPT_SUBNET_MASK: Final = 1
OPT_ROUTER: Final = 3
OPT_DNS: Final = 6
OPT_HOSTNAME: Final = 12
OPT_DOMAIN_NAME: Final = 15
OPT_MTU: Final = 26
OPT_REQUESTED_IP: Final = 50
OPT_LEASE_TIME: Final = 51
OPT_OVERLOAD: Final = 52
OPT_MESSAGE_TYPE: Final = 53
OPT_SERVER_ID: Final = 54
OPT_PARAM_REQUEST: Final = 55
OPT_MESSAGE: Final = 56
OPT_MAX_MESSAGE_SIZE: Final = 57
OPT_RENEWAL_TIME: Final = 58
OPT_REBINDING_TIME: Final = 59
OPT_CLIENT_ID: Final = 61
OPT_CLIENT_FQDN: Final = 81  # RFC 4702
OPT_DOMAIN_SEARCH: Final = 119  # RFC 3397
OPT_END: Final = 255

ZERO_ADDR: Final = bytes(4)

# RFC 4702 §2.1 Client FQDN flags: S (server updates A), O (server overrode S), E (canonical wire encoding),
# N (no server updates).
FQDN_FLAG_S: Final = 0x01
FQDN_FLAG_O: Final = 0x02
FQDN_FLAG_E: Final = 0x04
FQDN_FLAG_N: Final = 0x08
FQDN_RCODE_SERVER: Final = 0xFF  # RFC 4702 §2.2: what a server sends in RCODE1/RCODE2

_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_MAX_NAME_POINTERS: Final = 128  # bound on compression pointers followed per name (RFC 1035 §4.1.4)


@dataclass(frozen=True, slots=True)
class DhcpMessage:
    """One BOOTP/DHCP message; addresses are 4 raw bytes, `chaddr` the whole 16-byte field."""

    op: int
    xid: int
    chaddr: bytes
    options: dict[int, bytes] = field(default_factory=dict)
    htype: int = HTYPE_ETHER
    hlen: int = 6
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: bytes = ZERO_ADDR
    yiaddr: bytes = ZERO_ADDR
    siaddr: bytes = ZERO_ADDR
    giaddr: bytes = ZERO_ADDR
    sname: bytes = b""
    file: bytes = b""

    @property
    def hw_addr(self) -> bytes:
        """The client hardware address, `hlen` bytes of `chaddr`."""
        return self.chaddr[: self.hlen]

    @property
    def message_type(self) -> int | None:
        """Option 53, or None for a plain BOOTP message (or a 53 of the wrong length, RFC 2132 §9.6)."""
        raw = self.options.get(OPT_MESSAGE_TYPE)
        if raw is None or len(raw) != 1:
            return None
        return raw[0]


def parse_dhcp(payload: memoryview) -> DhcpMessage:
    """RFC 2131 §2 header, §3 magic cookie, RFC 2132 §2 option TLVs up to END or the end of the buffer.

    PAD is skipped; a missing END is tolerated (bytes simply run out); anything after END is padding.
    """
    if len(payload) < DHCP_OPTIONS_OFFSET:
        raise MalformedFrame("dhcp.truncated")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file, cookie) = (
        _BOOTP.unpack_from(payload)
    )
    if cookie != MAGIC_COOKIE:
        raise MalformedFrame("dhcp.bad_cookie")
    if hlen > 16:
        raise MalformedFrame("dhcp.bad_hlen")
    parts: dict[int, bytearray] = {}
    end = len(payload)
    pos = DHCP_OPTIONS_OFFSET
    while pos < end:
        code = payload[pos]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            pos += 1
            continue
        if pos + 2 > end:
            raise MalformedFrame("dhcp.bad_option_len")
        length = payload[pos + 1]
        start = pos + 2
        pos = start + length
        if pos > end:
            raise MalformedFrame("dhcp.bad_option_len")
        parts.setdefault(code, bytearray()).extend(payload[start:pos])  # RFC 3396 concatenation
    options = {code: bytes(value) for code, value in parts.items()}
    return DhcpMessage(
        op=op,
        xid=xid,
        chaddr=chaddr,
        options=options,
        htype=htype,
        hlen=hlen,
        hops=hops,
        secs=secs,
        flags=flags,
        ciaddr=ciaddr,
        yiaddr=yiaddr,
        siaddr=siaddr,
        giaddr=giaddr,
        sname=sname,
        file=file,
    )


def build_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """RFC 2132 §2 TLVs followed by END; values over 255 bytes are split into instances (RFC 3396 §5)."""
    out = bytearray()
    for code, value in options:
        if not 0 < code < OPT_END:
            raise ValueError(f"option code {code} cannot carry data")
        if not value:
            out += bytes((code, 0))
        for i in range(0, len(value), 255):
            chunk = value[i : i + 255]
            out += bytes((code, len(chunk)))
            out += chunk
    out.append(OPT_END)
    return bytes(out)


def build_dhcp(msg: DhcpMessage, *, min_len: int = BOOTP_MIN_LEN) -> bytes:
    """RFC 2131 §2 header, cookie, options in `msg.options` order, END, PAD to `min_len` (RFC 1542 §2.1)."""
    if len(msg.chaddr) > 16 or len(msg.sname) > 64 or len(msg.file) > 128:
        raise ValueError("chaddr, sname or file too long")
    header = _BOOTP.pack(
        msg.op,
        msg.htype,
        msg.hlen,
        msg.hops,
        msg.xid,
        msg.secs,
        msg.flags,
        msg.ciaddr,
        msg.yiaddr,
        msg.siaddr,
        msg.giaddr,
        msg.chaddr,
        msg.sname,
        msg.file,
        MAGIC_COOKIE,
    )
    out = header + build_options(msg.options.items())
    if len(out) < min_len:
        out += bytes(min_len - len(out))
    return out


# --- option values (RFC 2132, RFC 3397) ------------------------------------------------------------------


def _fixed(raw: bytes, size: int) -> bytes:
    if len(raw) != size:
        raise MalformedFrame("dhcp.bad_option_value")
    return raw


def pack_ip(addr: IPv4Address) -> bytes:
    return addr.packed


def unpack_ip(raw: bytes) -> IPv4Address:
    return IPv4Address(_fixed(raw, 4))


def pack_ips(addrs: Sequence[IPv4Address]) -> bytes:
    return b"".join(a.packed for a in addrs)


def unpack_ips(raw: bytes) -> tuple[IPv4Address, ...]:
    """RFC 2132 §3.5 and friends: one or more addresses, so length is a non-zero multiple of 4."""
    if not raw or len(raw) % 4:
        raise MalformedFrame("dhcp.bad_option_value")
    return tuple(IPv4Address(raw[i : i + 4]) for i in range(0, len(raw), 4))


def pack_u8(value: int) -> bytes:
    return bytes((value,))


def unpack_u8(raw: bytes) -> int:
    return _fixed(raw, 1)[0]


def pack_u16(value: int) -> bytes:
    return _U16.pack(value)


def unpack_u16(raw: bytes) -> int:
    value: int = _U16.unpack(_fixed(raw, 2))[0]
    return value


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def unpack_u32(raw: bytes) -> int:
    value: int = _U32.unpack(_fixed(raw, 4))[0]
    return value


def pack_text(text: str) -> bytes:
    """NVT ASCII without a trailing NUL (RFC 2132 §2)."""
    return text.encode("ascii")


def unpack_text(raw: bytes) -> str:
    """Some clients add a trailing NUL; drop it, and never fail on odd bytes."""
    return raw.rstrip(b"\x00").decode("ascii", "replace")


def encode_dns_name(name: str) -> bytes:
    """RFC 1035 §3.1 wire form of one name, uncompressed; ValueError for names that cannot be encoded."""
    name = name.rstrip(".")
    if not name:
        raise ValueError("empty domain name")
    out = bytearray()
    for label in name.encode("ascii").split(b"."):
        if not 0 < len(label) < 64:
            raise ValueError(f"bad label in domain name {name!r}")
        out.append(len(label))
        out += label
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"domain name too long {name!r}")
    return bytes(out)


def pack_domain_search(names: Sequence[str]) -> bytes:
    """RFC 3397 §2: the names back to back; compression is allowed but not required, so we do not use it."""
    return b"".join(encode_dns_name(n) for n in names)


def _decode_name(raw: bytes, pos: int) -> tuple[str, int]:
    """One name starting at `pos`; returns it and the offset after it in the uncompressed stream."""
    labels: list[str] = []
    resume = -1
    pointers = 0
    wire_len = 1  # the root label
    while True:
        if pos >= len(raw):
            raise MalformedFrame("dhcp.bad_domain_name")
        length = raw[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0 == 0xC0:  # RFC 1035 §4.1.4 pointer, relative to the option data (RFC 3397 §2)
            if pos + 2 > len(raw):
                raise MalformedFrame("dhcp.bad_domain_name")
            pointers += 1
            if pointers > _MAX_NAME_POINTERS:
                raise MalformedFrame("dhcp.bad_domain_name")
            if resume < 0:
                resume = pos + 2
            pos = ((length & 0x3F) << 8) | raw[pos + 1]
            continue
        if length & 0xC0:
            raise MalformedFrame("dhcp.bad_domain_name")
        wire_len += 1 + length
        if pos + 1 + length > len(raw) or wire_len > 255:
            raise MalformedFrame("dhcp.bad_domain_name")
        labels.append(raw[pos + 1 : pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    return ".".join(labels), resume if resume >= 0 else pos


def unpack_domain_search(raw: bytes) -> tuple[str, ...]:
    """RFC 3397 §2 list, following compression pointers (bounded, so loops cannot hang us)."""
    names: list[str] = []
    pos = 0
    while pos < len(raw):
        name, pos = _decode_name(raw, pos)
        names.append(name)
    return tuple(names)


class ClientFqdn(NamedTuple):
    """RFC 4702 §2 Client FQDN option: flags, the two deprecated RCODE bytes, the name (no trailing dot)."""

    flags: int
    rcode1: int
    rcode2: int
    name: str


def pack_client_fqdn(value: ClientFqdn) -> bytes:
    """RFC 4702 §2: with the E flag the name is in DNS wire form (§2.3.1), else ASCII (deprecated)."""
    if value.flags & FQDN_FLAG_E:
        name = encode_dns_name(value.name)
    else:
        name = value.name.rstrip(".").encode("ascii")
    return bytes((value.flags, value.rcode1, value.rcode2)) + name


def unpack_client_fqdn(raw: bytes) -> ClientFqdn:
    """RFC 4702 §2; a client may send an empty name (§3.1: it wants the server to provide one)."""
    if len(raw) < 3:
        raise MalformedFrame("dhcp.bad_option_value")
    flags, body = raw[0], raw[3:]
    if not flags & FQDN_FLAG_E:
        return ClientFqdn(flags, raw[1], raw[2], body.rstrip(b"\x00").decode("ascii", "replace"))
    if not body:
        return ClientFqdn(flags, raw[1], raw[2], "")
    names = unpack_domain_search(body)
    return ClientFqdn(flags, raw[1], raw[2], names[0])


def _identity(raw: bytes) -> bytes:
    return raw


class OptionSpec(NamedTuple):
    name: str
    pack: Callable[[Any], bytes]
    unpack: Callable[[bytes], Any]


OPTIONS: Final[dict[int, OptionSpec]] = {
    OPT_SUBNET_MASK: OptionSpec("subnet_mask", pack_ip, unpack_ip),
    OPT_ROUTER: OptionSpec("router", pack_ips, unpack_ips),
    OPT_DNS: OptionSpec("dns", pack_ips, unpack_ips),
    OPT_HOSTNAME: OptionSpec("hostname", pack_text, unpack_text),
    OPT_DOMAIN_NAME: OptionSpec("domain_name", pack_text, unpack_text),
    OPT_MTU: OptionSpec("interface_mtu", pack_u16, unpack_u16),
    OPT_REQUESTED_IP: OptionSpec("requested_ip", pack_ip, unpack_ip),
    OPT_LEASE_TIME: OptionSpec("lease_time", pack_u32, unpack_u32),
    OPT_OVERLOAD: OptionSpec("overload", pack_u8, unpack_u8),
    OPT_MESSAGE_TYPE: OptionSpec("message_type", pack_u8, unpack_u8),
    OPT_SERVER_ID: OptionSpec("server_id", pack_ip, unpack_ip),
    OPT_PARAM_REQUEST: OptionSpec("parameter_request_list", bytes, _identity),
    OPT_MESSAGE: OptionSpec("message", pack_text, unpack_text),
    OPT_MAX_MESSAGE_SIZE: OptionSpec("max_message_size", pack_u16, unpack_u16),
    OPT_RENEWAL_TIME: OptionSpec("renewal_time", pack_u32, unpack_u32),
    OPT_REBINDING_TIME: OptionSpec("rebinding_time", pack_u32, unpack_u32),
    OPT_CLIENT_ID: OptionSpec("client_id", bytes, _identity),
    OPT_CLIENT_FQDN: OptionSpec("client_fqdn", pack_client_fqdn, unpack_client_fqdn),
    OPT_DOMAIN_SEARCH: OptionSpec("domain_search", pack_domain_search, unpack_domain_search),
}


def encode_option(code: int, value: Any) -> bytes:
    """Option data for `code` from its Python value, through the table."""
    return OPTIONS[code].pack(value)


def decode_option(code: int, raw: bytes) -> Any:
    """Python value of option data; raw bytes for codes not in the table; MalformedFrame on a bad value."""
    spec = OPTIONS.get(code)
    return raw if spec is None else spec.unpack(raw)
