"""pesto protocol version 2: the bytes, and the mapping between pesto's rule tables and passtd's tables.

Pure (no sockets, no asyncio): the server (`control/pesto.py`) and the `pesto` command (`pesto_cli.py`) both
use it, and the tests check it byte for byte.

Wire format (upstream passt: pesto.h, serialise.c, fwd_rule.h/.c, conf.c), all integers big-endian:

    server → client, on accept:
      hello (20 bytes)      magic[8] = "basil:s\\0", u32 version = 2, u32 pif_name_size = 128,
                            u32 ifnamsiz = 16
      per pif:              u8 pif (HOST = 1, SPLICE = 3; never 0)
                            pif_info (136 bytes): name[128] NUL-padded, u32 caps, u32 count
                            count x rule (56 bytes)
      end                   u8 0 (PIF_NONE)
    client → server, only to change something (a client that only shows closes without sending):
      per pif:              u8 pif, u32 count, count x rule
      end                   u8 0
    The client's tables replace the server's as a whole. Upstream sends nothing back; passtd (an extension
    that upstream's client never reads, because it shuts the socket down after sending) answers with a
    result: magic[8] = "basil:r\\0", u32 status (0 applied, 1 refused, 2 rolled back), u32 length, text.

    rule (struct fwd_rule, 56 bytes, no padding: every member is naturally aligned)
      0  addr[16]     listening address as an IPv4-mapped or IPv6 address; "::" with DUAL_STACK_ANY = any
      16 taddr[16]    target address on the other side; unspecified (:: or ::ffff:0.0.0.0) = none
      32 ifname[16]   listening interface, NUL-terminated ("" = any)
      48 u16 first    first listening port          (the only members byte-swapped, by fwd_rule_write())
      50 u16 last     last listening port
      52 u16 to       target port of `first`; port n goes to to + (n - first)
      54 u8  proto    IPPROTO_TCP (6) or IPPROTO_UDP (17)
      55 u8  flags    DUAL_STACK_ANY 1, WEAK 2 (bind failures tolerated: "all"), SCAN 4 ("auto")

    caps (u32): IPV4 1, IPV6 2, TCP 4, UDP 8, SCAN 16 (pasta's "auto"), IFNAME 32 (SO_BINDTODEVICE).

Version 1 had no `taddr` (40-byte rules, a 12-byte hello): upstream dropped compatibility, and so do we.
The order of `addr`, `taddr` and `ifname` is taken from upstream's designated initialisers (fwd_rule.c);
the v2 header itself was not in the mirrors we could read, so `RULE` is the one place to change if it differs.

Mapping: the HOST pif holds `tcp_in` (-t) and `udp_in` (-u); SPLICE (pasta only) holds `tcp_out` (-T) and
`udp_out` (-U), whose rules upstream scopes to interface "lo" (0.0.0.0%lo or ::%lo when the server has one
family), or to 127.0.0.1 and ::1 without SO_BINDTODEVICE; all of them are passtd's unscoped -T/-U rules
(listening on both loopbacks of the namespace). "all" is sent as
WEAK rules over every non-ephemeral port minus the exclusions, "auto" as WEAK|SCAN rules over every
non-ephemeral port, so upstream's client shows and edits them as upstream's server would present them.
Unscoped rules are listed dual-stack ("*"), or, on a server with one family, with that family's wildcard,
as upstream's parser writes them (see `server_tables`).
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Final, Literal

from passtd.dataplane.core.fwd import (
    NONE,
    PORT_MAX,
    PORT_MIN,
    Addr,
    Direction,
    ForwardRule,
    ForwardTables,
    PortPolicy,
)
from passtd.errors import ConfigError

MAGIC: Final = b"basil:s\0"
RESULT_MAGIC: Final = b"basil:r\0"
VERSION: Final = 2
PIF_NAME_SIZE: Final = 128
IFNAMSIZ: Final = 16
PIF_NONE: Final = 0
PIF_HOST: Final = 1
PIF_TAP: Final = 2
PIF_SPLICE: Final = 3
PIF_NAMES: Final[dict[int, str]] = {PIF_HOST: "HOST", PIF_TAP: "TAP", PIF_SPLICE: "SPLICE"}

CAP_IPV4: Final = 1 << 0
CAP_IPV6: Final = 1 << 1
CAP_TCP: Final = 1 << 2
CAP_UDP: Final = 1 << 3
CAP_SCAN: Final = 1 << 4
CAP_IFNAME: Final = 1 << 5

DUAL_STACK_ANY: Final = 1 << 0
WEAK: Final = 1 << 1
SCAN: Final = 1 << 2
KNOWN_FLAGS: Final = DUAL_STACK_ANY | WEAK | SCAN

IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
PROTO_NAMES: Final = {IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP"}

HELLO: Final = struct.Struct("!8sIII")
PIF_INFO: Final = struct.Struct(f"!{PIF_NAME_SIZE}sII")
RULE: Final = struct.Struct(f"!16s16s{IFNAMSIZ}sHHHBB")
COUNT: Final = struct.Struct("!I")
RESULT: Final = struct.Struct("!8sII")

STATUS_APPLIED: Final = 0
STATUS_REFUSED: Final = 1
STATUS_ROLLED_BACK: Final = 2

# Rules one pif may carry in one message: a bound on what a client can make the server read (7 MiB), not a
# cap of the tables (which have none): every port of both protocols as its own rule fits. Upstream's tables
# hold 255 rules and its client refuses a longer table from passtd ("Too many forwarding rules").
MAX_RULES: Final = 2 * 65535
MAX_RESULT_TEXT: Final = 64 * 1024

_V4MAPPED: Final = b"\0" * 10 + b"\xff\xff"
_DIRECTIONS: Final[dict[int, tuple[Direction, Direction]]] = {
    PIF_HOST: ("tcp_in", "udp_in"),
    PIF_SPLICE: ("tcp_out", "udp_out"),
}
_PROTO_OF: Final[dict[Direction, int]] = {
    "tcp_in": IPPROTO_TCP,
    "udp_in": IPPROTO_UDP,
    "tcp_out": IPPROTO_TCP,
    "udp_out": IPPROTO_UDP,
}
_LOOPBACKS: Final = (IPv4Address("127.0.0.1"), IPv6Address("::1"))

assert HELLO.size == 20 and PIF_INFO.size == 136 and RULE.size == 56 and RESULT.size == 16


class PestoError(Exception):
    """Bytes or rules this end refuses; the message is one line, for a log or stderr."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One struct fwd_rule, decoded. Addresses are canonical: IPv4 as IPv4Address, "none" as None."""

    addr: Addr | None  # None: any address of both families (DUAL_STACK_ANY)
    taddr: Addr | None
    ifname: str
    first: int
    last: int
    to: int
    proto: int
    flags: int = 0

    def conflicts(self, other: Rule) -> bool:
        """Upstream's fwd_rule_conflicts: same protocol, addresses that can meet, overlapping ports."""
        if self.proto != other.proto or self.last < other.first or other.last < self.first:
            return False
        a, b = self.addr, other.addr
        if a is None or b is None:
            return True
        if a.is_unspecified or b.is_unspecified:
            return a.version == b.version
        return a == b

    def fmt(self) -> str:
        """Upstream's fwd_rule_fmt(), character for character (pesto --show prints these)."""
        addr = "*" if self.addr is None else str(self.addr)
        pct = f"%{self.ifname}" if self.ifname else ""
        taddr = f"{self.taddr}:" if self.taddr is not None else ""
        weak = " (best effort)" if self.flags & WEAK else ""
        scan = " (auto-scan)" if self.flags & SCAN else ""
        proto = PROTO_NAMES.get(self.proto, "<unknown protocol>")
        if self.first == self.last:
            return f"{proto} [{addr}]{pct}:{self.first}  =>  {taddr}{self.to} {weak}{scan}"
        tolast = (self.last - self.first + self.to) & 0xFFFF
        return f"{proto} [{addr}]{pct}:{self.first}-{self.last}  =>  {taddr}{self.to}-{tolast} {weak}{scan}"


@dataclass(slots=True)
class PifTable:
    pif: int
    name: str
    caps: int
    rules: list[Rule] = field(default_factory=list)


# -- bytes ------------------------------------------------------------------------------------------


def _pack_addr(addr: Addr | None) -> bytes:
    if addr is None:
        return bytes(16)
    if isinstance(addr, IPv4Address):
        return _V4MAPPED + addr.packed
    return addr.packed


def _unpack_addr(raw: bytes) -> Addr:
    if raw[:12] == _V4MAPPED:
        return IPv4Address(raw[12:])
    return IPv6Address(raw)


def pack_rule(rule: Rule) -> bytes:
    addr = IPv6Address("::") if rule.addr is None else rule.addr
    flags = rule.flags | (DUAL_STACK_ANY if rule.addr is None else 0)
    ifname = rule.ifname.encode()
    if len(ifname) >= IFNAMSIZ:
        raise PestoError(f"interface name '{rule.ifname}' is longer than {IFNAMSIZ - 1} bytes")
    return RULE.pack(
        _pack_addr(addr), _pack_addr(rule.taddr), ifname, rule.first, rule.last, rule.to, rule.proto, flags
    )


def unpack_rule(raw: bytes) -> Rule:
    """One 56-byte rule; PestoError for what upstream's fwd_rule_add() or conf_recv_rules() refuses."""
    addr_raw, taddr_raw, ifname_raw, first, last, to, proto, flags = RULE.unpack(raw)
    if ifname_raw[-1] != 0:
        raise PestoError("interface name was not NUL terminated")
    ifname_bytes = ifname_raw.split(b"\0", 1)[0]
    try:
        ifname = ifname_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise PestoError(f"interface name {ifname_bytes!r} is not ASCII") from None
    if flags & ~KNOWN_FLAGS:
        raise PestoError(f"rule has invalid flags 0x{flags & ~KNOWN_FLAGS:x}")
    if proto not in PROTO_NAMES:
        raise PestoError(f"unsupported protocol {proto} for forwarding rule")
    if not first or first > last:
        raise PestoError(f"rule has invalid port range {first}-{last}")
    if not to or to + last - first > PORT_MAX:
        raise PestoError("forwarding rule attempts to map to port 0")
    addr: Addr | None = _unpack_addr(addr_raw)
    if flags & DUAL_STACK_ANY:
        if addr != IPv6Address("::"):
            raise PestoError(f"dual stack rule has non-wildcard address {addr}")
        addr = None
    taddr: Addr | None = _unpack_addr(taddr_raw)
    if taddr is not None and taddr.is_unspecified:
        taddr = None
    return Rule(addr, taddr, ifname, first, last, to, proto, flags & ~DUAL_STACK_ANY)


def pack_hello(version: int = VERSION) -> bytes:
    return HELLO.pack(MAGIC, version, PIF_NAME_SIZE, IFNAMSIZ)


def check_hello(raw: bytes) -> None:
    """A client's check of the server's hello (upstream pesto's messages), refusing anything but version 2."""
    magic, version, pif_name_size, ifnamsiz = HELLO.unpack(raw)
    if magic != MAGIC:
        raise PestoError("Bad magic number from server")
    if version > VERSION:
        raise PestoError(f"Unknown server protocol version {version} > {VERSION}")
    if version == 0:
        raise PestoError("Unsupported experimental server protocol")
    if version < VERSION:
        raise PestoError(f"Unsupported server protocol version {version} (this pesto speaks {VERSION})")
    if pif_name_size != PIF_NAME_SIZE:
        raise PestoError(f"Server has unexpected pif name size ({pif_name_size} not {PIF_NAME_SIZE})")
    if ifnamsiz != IFNAMSIZ:
        raise PestoError(f"Server has unexpected IFNAMSIZ ({ifnamsiz} not {IFNAMSIZ})")


def pack_pif_info(table: PifTable) -> bytes:
    return PIF_INFO.pack(table.name.encode(), table.caps, len(table.rules))


def unpack_pif_info(raw: bytes) -> tuple[str, int, int]:
    name_raw, caps, count = PIF_INFO.unpack(raw)
    if name_raw[-1] != 0:
        raise PestoError("Interface name was not NULL terminated")
    return name_raw.split(b"\0", 1)[0].decode("ascii", "replace"), caps, count


def pack_server_tables(tables: Sequence[PifTable]) -> bytes:
    """What the server sends after its hello: every pif with its rules, then PIF_NONE."""
    out = bytearray()
    for table in tables:
        out += bytes((table.pif,)) + pack_pif_info(table)
        for rule in table.rules:
            out += pack_rule(rule)
    out.append(PIF_NONE)
    return bytes(out)


def pack_client_tables(tables: Sequence[PifTable]) -> bytes:
    """What a client sends to change the tables: every pif it knows, with its whole new table."""
    out = bytearray()
    for table in tables:
        out += bytes((table.pif,)) + COUNT.pack(len(table.rules))
        for rule in table.rules:
            out += pack_rule(rule)
    out.append(PIF_NONE)
    return bytes(out)


def pack_result(status: int, text: str) -> bytes:
    body = text.encode()[:MAX_RESULT_TEXT]
    return RESULT.pack(RESULT_MAGIC, status, len(body)) + body


# -- passtd's tables <-> pesto's ----------------------------------------------------------------------


def _runs(ports: Iterable[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for port in sorted(ports):
        if runs and port == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], port)
        else:
            runs.append((port, port))
    return runs


def _everything(ephemeral: tuple[int, int]) -> set[int]:
    lo, hi = ephemeral
    return {p for p in range(PORT_MIN, PORT_MAX + 1) if not lo <= p <= hi}


def policy_rules(
    direction: Direction,
    policy: PortPolicy,
    ephemeral: tuple[int, int],
    splice_ifname: bool = True,
    any_addr: Addr | None = None,
) -> list[Rule]:
    """One direction's policy as upstream's server would list it. `any_addr` (0.0.0.0 or ::, for a server
    with one family) stands for "any address", as upstream's parser writes it then."""
    proto = _PROTO_OF[direction]
    splice = direction.endswith("_out")
    if policy.mode == "spec":
        return [
            Rule(
                any_addr if r.bind_addr is None else r.bind_addr,
                r.target_addr,
                "lo" if splice and splice_ifname else (r.ifname or ""),
                r.first,
                r.last,
                r.target_first,
                proto,
            )
            for r in policy.rules
        ]
    if policy.mode in ("all", "auto"):
        ports = _everything(ephemeral) - set(policy.excluded)
        flags = WEAK | (SCAN if policy.mode == "auto" else 0)
        ifname = "lo" if splice and splice_ifname else (policy.ifname or "")
        addr = any_addr if policy.bind_addr is None else policy.bind_addr
        return [Rule(addr, None, ifname, a, b, a, proto, flags) for a, b in _runs(ports)]
    return []


def _unscoped(r: Rule) -> Rule:
    return Rule(None, r.taddr, r.ifname, r.first, r.last, r.to, r.proto, r.flags)


def _rules_policy(
    direction: Direction, rules: Sequence[Rule], ephemeral: tuple[int, int], implicit: Collection[Rule] = ()
) -> PortPolicy:
    """The PortPolicy for one protocol's rules of one pif; PestoError for what passtd cannot represent.
    `implicit`: rules the server listed with 0.0.0.0 (or ::) standing for passtd's "any address"."""
    if not rules:
        return NONE
    if implicit:
        rules = [_unscoped(r) if r in implicit else r for r in rules]
    splice = direction.endswith("_out")
    if splice:  # upstream scopes -T/-U to "lo" (or to the loopback addresses): passtd listens there anyway
        for rule in rules:
            on_lo = rule.ifname == "lo" and (
                rule.addr is None or rule.addr.is_unspecified
            )  # one family: 0.0.0.0%lo
            if not on_lo and (rule.ifname or rule.addr not in (None, *_LOOPBACKS)):
                raise PestoError(f"{rule.fmt()}: -T/-U rules listen on loopback only")
        rules = list(
            dict.fromkeys(Rule(None, r.taddr, "", r.first, r.last, r.to, r.proto, r.flags) for r in rules)
        )
    weak = [r for r in rules if r.flags & (WEAK | SCAN)]
    if weak:
        if len(weak) != len(rules) or len({(r.flags, r.addr, r.ifname) for r in rules}) != 1:
            raise PestoError(
                f"{weak[0].fmt()}: passtd forwards 'all' or 'auto' as a whole table, not beside other rules"
            )
        if any(r.to != r.first or r.taddr is not None for r in rules):
            raise PestoError(f"{weak[0].fmt()}: 'all' and 'auto' forward ports unchanged, to the guest")
        covered = {p for r in rules for p in range(r.first, r.last + 1)}
        lo, hi = ephemeral
        excluded = frozenset(
            p for p in range(PORT_MIN, PORT_MAX + 1) if p not in covered and not lo <= p <= hi
        )
        if weak[0].flags & SCAN:
            if excluded:
                raise PestoError(f"{weak[0].fmt()}: passtd scans ('auto') every port or none")
            return PortPolicy("auto")
        try:
            return PortPolicy(
                "all", excluded=excluded, bind_addr=rules[0].addr, ifname=rules[0].ifname or None
            )
        except ConfigError as exc:
            raise PestoError(str(exc)) from None
    try:
        return PortPolicy(
            "spec",
            tuple(ForwardRule(r.addr, r.ifname or None, r.first, r.last, r.to, r.taddr) for r in rules),
        )
    except ConfigError as exc:
        raise PestoError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Presentation:
    """The rules last committed through pesto, per direction, with the policy they became.

    passtd keeps policies canonical (adjacent ranges merged), but upstream's client deletes by exact rule:
    listing `-t 8080 -t 8081` back as one `8080-8081` rule would make `-D -t 8080` fail. So while a
    direction's policy is still what a pesto commit made it, the server lists that commit's rules verbatim.
    """

    policies: Mapping[Direction, PortPolicy]
    rules: Mapping[Direction, tuple[Rule, ...]]


def server_tables(
    tables: ForwardTables,
    ipv4: bool,
    ipv6: bool,
    ephemeral: tuple[int, int],
    shown: Presentation | None = None,
    implicit: set[Rule] | None = None,
) -> list[PifTable]:
    """passtd's four tables as pesto pifs: HOST always, SPLICE in pasta mode.

    On a server with one family upstream writes "any address" as that family's wildcard, so passtd's
    unscoped rules are listed that way too (and `-D -t 22` from upstream's client matches them); the rules
    listed so are added to `implicit`, which `tables_from_pifs` needs to read them back as unscoped, while a
    0.0.0.0 the client writes itself stays an explicit 0.0.0.0.
    """
    any_addr = family_any(ipv4, ipv6)
    caps = (CAP_IPV4 if ipv4 else 0) | (CAP_IPV6 if ipv6 else 0) | CAP_TCP | CAP_UDP | CAP_IFNAME
    if tables.mode == "pasta":
        caps |= CAP_SCAN
    out: list[PifTable] = []
    for pif, directions in _DIRECTIONS.items():
        if pif == PIF_SPLICE and tables.mode != "pasta":
            continue
        table = PifTable(pif, PIF_NAMES[pif], caps)
        for direction in directions:
            policy = tables.policy(direction)
            if shown is not None and shown.policies.get(direction) == policy:
                listed = list(shown.rules[direction])
                if implicit is not None and any_addr is not None:
                    implicit.update(r for r in listed if r.addr == any_addr and _unscoped_at(policy, r.first))
            else:
                listed = policy_rules(direction, policy, ephemeral, any_addr=any_addr)
                if implicit is not None and any_addr is not None:
                    implicit.update(r for r in listed if r.addr == any_addr and _unscoped_at(policy, r.first))
            table.rules.extend(listed)
        out.append(table)
    return out


def _unscoped_at(policy: PortPolicy, port: int) -> bool:
    """Whether `policy` forwards `port` from any address (bind address None)."""
    if policy.mode == "spec":
        return any(r.bind_addr is None and r.first <= port <= r.last for r in policy.rules)
    return policy.bind_addr is None


def family_any(ipv4: bool, ipv6: bool) -> Addr | None:
    """The wildcard address upstream writes for "any" on a server with one family; None with both."""
    if ipv4 and not ipv6:
        return IPv4Address("0.0.0.0")
    if ipv6 and not ipv4:
        return IPv6Address("::")
    return None


def tables_from_pifs(
    current: ForwardTables,
    pifs: Mapping[int, Sequence[Rule]],
    ephemeral: tuple[int, int],
    implicit: Collection[Rule] = (),
) -> tuple[ForwardTables, Presentation]:
    """The client's new tables (pifs it did not send keep their rules) and how to list them back.
    `implicit`: what `server_tables` collected for the client."""
    policies: dict[Direction, PortPolicy] = {d: current.policy(d) for d in _PROTO_OF}
    shown: dict[Direction, tuple[Rule, ...]] = {}
    for pif, rules in pifs.items():
        if pif not in _DIRECTIONS or (pif == PIF_SPLICE and current.mode != "pasta"):
            raise PestoError(f"received rules for non-existent table {pif}")
        for direction in _DIRECTIONS[pif]:
            mine = tuple(r for r in rules if r.proto == _PROTO_OF[direction])
            policies[direction] = _rules_policy(direction, mine, ephemeral, implicit)
            shown[direction] = mine
    try:
        new = ForwardTables(current.mode, **policies)
    except ConfigError as exc:
        raise PestoError(str(exc)) from None
    return new, Presentation({d: policies[d] for d in shown}, shown)


def merge(base: ForwardTables, current: ForwardTables, wanted: ForwardTables) -> ForwardTables:
    """Three-way merge per direction, for clients whose exchanges overlap.

    A client's `wanted` tables were edited from the `base` it was sent; if `current` has moved since (another
    client committed first), a direction the client left alone keeps `current`, a direction only the client
    changed takes `wanted`, and one both changed is merged port by port when both are plain rule tables
    (the client's additions and deletions applied to `current`), else the client's version wins.
    """
    out: dict[Direction, PortPolicy] = {}
    for direction in _PROTO_OF:
        b, c, w = base.policy(direction), current.policy(direction), wanted.policy(direction)
        plain = all(p.mode in ("spec", "none") for p in (b, c, w))
        if w == b:
            out[direction] = c
        elif c == b or not plain:
            out[direction] = w
        else:
            out[direction] = _merge_ports(b, c, w)
    return ForwardTables(current.mode, **out)


def _port_map(policy: PortPolicy) -> dict[tuple[Addr | None, str | None, int], tuple[int, Addr | None]]:
    return {
        (r.bind_addr, r.ifname, p): (r.target_first + p - r.first, r.target_addr)
        for r in policy.rules
        for p in range(r.first, r.last + 1)
    }


def _merge_ports(base: PortPolicy, current: PortPolicy, wanted: PortPolicy) -> PortPolicy:
    b, c, w = _port_map(base), _port_map(current), _port_map(wanted)
    merged = dict(c)
    for key in b.keys() - w.keys():
        merged.pop(key, None)
    for key, value in w.items():
        if b.get(key) != value:
            merged[key] = value
    if not merged:
        return NONE
    rules: list[ForwardRule] = []
    for (addr, ifname, port), (target, taddr) in sorted(
        merged.items(), key=lambda kv: (kv[0][2], str(kv[0][0]), kv[0][1] or "")
    ):
        rules.append(ForwardRule(addr, ifname, port, port, target, taddr))
    try:
        return PortPolicy("spec", tuple(rules))
    except ConfigError:
        return wanted  # the merge conflicts with itself (another client forwarded the port elsewhere)


def direction_of(pif: int, proto: int) -> Literal["tcp_in", "udp_in", "tcp_out", "udp_out"]:
    tcp, udp = _DIRECTIONS[pif]
    return tcp if proto == IPPROTO_TCP else udp
