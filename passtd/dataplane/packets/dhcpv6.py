"""DHCPv6 (RFC 8415) client/server messages: a type, a transaction id and a flat list of options.

Options are kept as (code, bytes) pairs; the few with inner structure that a single-address server needs
(IA_NA/IA_TA/IA_PD, IA Address, Status Code) have their own parse/build helpers. Relay messages
(RFC 8415 §9) have another layout and are not handled: a guest talks to us directly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from ipaddress import IPv6Address
from typing import Final, NamedTuple

from passtd.dataplane.packets.dhcp import encode_dns_name
from passtd.errors import MalformedFrame

DHCPV6_CLIENT_PORT: Final = 546
DHCPV6_SERVER_PORT: Final = 547
ALL_DHCP_RELAY_AGENTS_AND_SERVERS: Final = IPv6Address("ff02::1:2")  # RFC 8415 §7.1

# RFC 8415 §7.3 message types.
MSG_SOLICIT: Final = 1
MSG_ADVERTISE: Final = 2
MSG_REQUEST: Final = 3
MSG_CONFIRM: Final = 4
MSG_RENEW: Final = 5
MSG_REBIND: Final = 6
MSG_REPLY: Final = 7
MSG_RELEASE: Final = 8
MSG_DECLINE: Final = 9
MSG_RECONFIGURE: Final = 10
MSG_INFORMATION_REQUEST: Final = 11
MSG_RELAY_FORW: Final = 12
MSG_RELAY_REPL: Final = 13

# RFC 8415 §21, RFC 3646 §3-4 option codes.
OPT_CLIENTID: Final = 1
OPT_SERVERID: Final = 2
OPT_IA_NA: Final = 3
OPT_IA_TA: Final = 4
OPT_IAADDR: Final = 5
OPT_ORO: Final = 6
OPT_PREFERENCE: Final = 7
OPT_ELAPSED_TIME: Final = 8
OPT_STATUS_CODE: Final = 13
OPT_RAPID_COMMIT: Final = 14
OPT_DNS_SERVERS: Final = 23
OPT_DOMAIN_LIST: Final = 24
OPT_IA_PD: Final = 25
OPT_IAPREFIX: Final = 26
OPT_CLIENT_FQDN: Final = 39  # RFC 4704 §4

# RFC 4704 §4.1 Client FQDN flags: S (server should update AAAA), O (server overrode S), N (no updates).
FQDN_FLAG_S: Final = 0x01
FQDN_FLAG_O: Final = 0x02
FQDN_FLAG_N: Final = 0x04

# RFC 8415 §21.13 status codes.
STATUS_SUCCESS: Final = 0
STATUS_UNSPEC_FAIL: Final = 1
STATUS_NO_ADDRS_AVAIL: Final = 2
STATUS_NO_BINDING: Final = 3
STATUS_NOT_ON_LINK: Final = 4
STATUS_USE_MULTICAST: Final = 5
STATUS_NO_PREFIX_AVAIL: Final = 6

DUID_LL: Final = 3  # RFC 8415 §11.4
HWTYPE_ETHERNET: Final = 1  # IANA ARP hardware type
INFINITY: Final = 0xFFFFFFFF  # RFC 8415 §7.7

MSG_HLEN: Final = 4
_MSG = struct.Struct("!I")  # msg-type (8 bits) + transaction-id (24 bits)
_OPT = struct.Struct("!HH")
_IA = struct.Struct("!III")  # IAID, T1, T2 (IA_NA §21.4, IA_PD RFC 8415 §21.21)
_IA_ADDR = struct.Struct("!16sII")  # address, preferred, valid (§21.6)
_STATUS = struct.Struct("!H")
_DUID_LL = struct.Struct("!HH")


class Dhcpv6Option(NamedTuple):
    code: int
    data: bytes


class Dhcpv6Message(NamedTuple):
    msg_type: int
    xid: int  # 24-bit transaction id
    options: tuple[Dhcpv6Option, ...]

    def get(self, code: int) -> bytes | None:
        """The first option with `code`: RFC 8415 §21 allows most options once per message."""
        for opt in self.options:
            if opt.code == code:
                return opt.data
        return None

    def get_all(self, code: int) -> tuple[bytes, ...]:
        """Every option with `code` (a client may send several IA_NA, each with its own IAID)."""
        return tuple(opt.data for opt in self.options if opt.code == code)


class Ia(NamedTuple):
    """IA_NA / IA_PD (T1 and T2 present) or IA_TA (reported as 0)."""

    iaid: int
    t1: int
    t2: int
    options: tuple[Dhcpv6Option, ...]


class IaAddress(NamedTuple):
    addr: IPv6Address
    preferred: int
    valid: int
    options: tuple[Dhcpv6Option, ...]


def parse_options(buf: memoryview | bytes, what: str = "dhcpv6") -> tuple[Dhcpv6Option, ...]:
    """RFC 8415 §21.1 option-code/option-len pairs up to the end of `buf`; zero lengths are legal here."""
    mv = memoryview(buf)
    options: list[Dhcpv6Option] = []
    off = 0
    end = len(mv)
    while off < end:
        if off + _OPT.size > end:
            raise MalformedFrame(f"{what}.option_truncated")
        code, length = _OPT.unpack_from(mv, off)
        off += _OPT.size
        if off + length > end:
            raise MalformedFrame(f"{what}.bad_option_len")
        options.append(Dhcpv6Option(code, bytes(mv[off : off + length])))
        off += length
    return tuple(options)


def parse_dhcpv6(payload: memoryview) -> Dhcpv6Message:
    """RFC 8415 §8 client/server message; relay messages (§9) are refused as not ours to parse."""
    if len(payload) < MSG_HLEN:
        raise MalformedFrame("dhcpv6.truncated")
    (word,) = _MSG.unpack_from(payload)
    msg_type = word >> 24
    if msg_type in (MSG_RELAY_FORW, MSG_RELAY_REPL):
        raise MalformedFrame("dhcpv6.relay_message")
    return Dhcpv6Message(msg_type, word & 0xFFFFFF, parse_options(payload[MSG_HLEN:]))


def parse_ia(code: int, data: bytes) -> Ia:
    """RFC 8415 §21.4 IA_NA, §21.5 IA_TA (IAID only), §21.21 IA_PD; inner options follow the fixed part."""
    if code == OPT_IA_TA:
        if len(data) < 4:
            raise MalformedFrame("dhcpv6.ia_truncated")
        return Ia(int.from_bytes(data[:4], "big"), 0, 0, parse_options(data[4:], "dhcpv6.ia"))
    if len(data) < _IA.size:
        raise MalformedFrame("dhcpv6.ia_truncated")
    iaid, t1, t2 = _IA.unpack_from(data)
    return Ia(iaid, t1, t2, parse_options(data[_IA.size :], "dhcpv6.ia"))


def parse_ia_address(data: bytes) -> IaAddress:
    """RFC 8415 §21.6 IA Address option body."""
    if len(data) < _IA_ADDR.size:
        raise MalformedFrame("dhcpv6.iaaddr_truncated")
    addr, preferred, valid = _IA_ADDR.unpack_from(data)
    return IaAddress(
        IPv6Address(addr), preferred, valid, parse_options(data[_IA_ADDR.size :], "dhcpv6.iaaddr")
    )


def parse_status_code(data: bytes) -> tuple[int, str]:
    """RFC 8415 §21.13: a 16-bit code and a UTF-8 message (decoded leniently: it is for display only)."""
    if len(data) < _STATUS.size:
        raise MalformedFrame("dhcpv6.status_truncated")
    return _STATUS.unpack_from(data)[0], data[_STATUS.size :].decode("utf-8", "replace")


class ClientFqdn6(NamedTuple):
    """RFC 4704 §4 Client FQDN: flags and the name (no trailing dot; empty when the client sends none)."""

    flags: int
    name: str


def parse_client_fqdn(data: bytes) -> ClientFqdn6:
    """RFC 4704 §4: one flags octet, then the name in DNS wire form (§4.2; a partial name ends without
    the root label)."""
    if len(data) < 1:
        raise MalformedFrame("dhcpv6.fqdn_truncated")
    labels: list[str] = []
    pos = 1
    while pos < len(data):
        length = data[pos]
        if length == 0:
            if pos + 1 != len(data):
                raise MalformedFrame("dhcpv6.bad_fqdn")
            break
        if length > 63 or pos + 1 + length > len(data):
            raise MalformedFrame("dhcpv6.bad_fqdn")
        labels.append(data[pos + 1 : pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    return ClientFqdn6(data[0], ".".join(labels))


def build_client_fqdn(flags: int, name: str) -> bytes:
    """RFC 4704 §4 option with a fully qualified name; ValueError for a name that cannot be encoded."""
    return build_option(OPT_CLIENT_FQDN, bytes((flags,)) + encode_dns_name(name))


def build_option(code: int, data: bytes) -> bytes:
    """RFC 8415 §21.1 option header + data."""
    return _OPT.pack(code, len(data)) + data


def build_dhcpv6(msg_type: int, xid: int, options: Iterable[bytes]) -> bytes:
    """RFC 8415 §8 message from already-encoded options (see `build_option` and friends)."""
    return _MSG.pack((msg_type << 24) | (xid & 0xFFFFFF)) + b"".join(options)


def build_duid_ll(mac: bytes) -> bytes:
    """RFC 8415 §11.4 DUID-LL: stable for as long as our MAC is, and needs no clock (unlike DUID-LLT)."""
    return _DUID_LL.pack(DUID_LL, HWTYPE_ETHERNET) + mac


def build_ia(code: int, iaid: int, t1: int, t2: int, options: Iterable[bytes] = ()) -> bytes:
    """IA_NA/IA_PD option (§21.4, §21.21); for IA_TA (§21.5) T1/T2 are not on the wire."""
    head = iaid.to_bytes(4, "big") if code == OPT_IA_TA else _IA.pack(iaid, t1, t2)
    return build_option(code, head + b"".join(options))


def build_ia_address(addr: IPv6Address, preferred: int, valid: int, options: Iterable[bytes] = ()) -> bytes:
    """RFC 8415 §21.6 IA Address option."""
    return build_option(OPT_IAADDR, _IA_ADDR.pack(addr.packed, preferred, valid) + b"".join(options))


def build_status_code(code: int, message: str = "") -> bytes:
    """RFC 8415 §21.13 Status Code option."""
    return build_option(OPT_STATUS_CODE, _STATUS.pack(code) + message.encode("utf-8"))


def build_dns_servers(servers: Sequence[IPv6Address]) -> bytes:
    """RFC 3646 §3 DNS Recursive Name Server option."""
    return build_option(OPT_DNS_SERVERS, b"".join(a.packed for a in servers))


def build_domain_list(names: Sequence[str]) -> bytes:
    """RFC 3646 §4 Domain Search List, uncompressed (RFC 8415 §10); unencodable names are left out,
    and with none left the result is empty."""
    wires: list[bytes] = []
    total = 0
    for name in names:
        try:
            wire = encode_dns_name(name)
        except ValueError:
            continue
        if total + len(wire) > 0xFFFF:
            break
        wires.append(wire)
        total += len(wire)
    if not wires:
        return b""
    return build_option(OPT_DOMAIN_LIST, b"".join(wires))
