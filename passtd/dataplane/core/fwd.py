"""Port-forwarding policy: passt's `-t/-u/-T/-U` specs as immutable values that the forwarder diffs.

Grammar, as passt(1) documents it and conf.c `conf_ports()` implements it::

    spec   := "none" | "all" | "auto" | [scope "/"] item ("," item)*
    scope  := [ADDR] ["%" IFNAME]       bind address and/or interface; -t/-u only (as passt)
    item   := range [":" target]        forward range, optionally to a target (range of equal length)
            | "~" range                 exclude, from every range of this spec
    target := range | TADDR | TADDR "/" range
                                        TADDR: the address on the other side (pesto v2's target address,
                                        `-t 0.0.0.0/8080:10.89.0.5/80`); IPv6 may be written in brackets
    range  := PORT ["-" PORT]           1 <= PORT <= 65535, start <= end

ADDR is an IPv4 or IPv6 literal without brackets (passt uses inet_pton). A spec made of exclusions only
forwards "all ports except those" (mode "all" with `excluded`). Several specs separated by whitespace behave
as repeated options (`-t 22 -t 127.0.0.1/80` ≡ `parse_spec("22 127.0.0.1/80")`); that is also how `to_spec`
writes policies whose rules have different scopes.

Rules taken from passt, with where we differ:

* `none`, `all` and `auto` cannot be combined with any other spec (passt: "conflicts with previous mode").
* Overlapping ranges are an error, not "later wins" (passt: "Overlapping port specifier"). As in passt, a port
  excluded by `~` does not count, and an exclusion overlapping another exclusion is an error.
  Extension: two rules overlap only if their scopes can bind the same socket (same address, or either one a
  wildcard, on the same or an unspecified interface), so `127.0.0.1/80 ::1/80` is allowed.
* Port 0 is rejected (passt's parser lets it through, then fails to bind it).
* `all` expands to 1..65535 minus `excluded` minus the ephemeral range passed to `ports()`; explicit ranges
  are honoured even inside the ephemeral range. Old passt hard-coded "below 49152" here.
* `auto` is only a flag: which ports it means is found by scanning the other side, not by the policy.
* A target address (as upstream's fwd_rule_add): not multicast, the same family as the bind address, and
  refused on a dual-stack (unscoped) rule, where upstream asks "Did you mean 0.0.0.0/... instead?". An
  unspecified target (0.0.0.0, ::) means "no target address": the guest's own, as without one.

Every `PortPolicy` is canonical (rules sorted, adjacent rules with the same scope and offset merged,
exclusions folded into split rules), so two policies forwarding the same ports compare equal, and
`parse_spec(p.to_spec()) == p` for every policy `p`.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final, Literal, TypeAlias, get_args

from passtd.dataplane.core.flowtable import FwdTally
from passtd.errors import ConfigError
from passtd.limits import ifname_problem as _ifname_problem

Addr: TypeAlias = IPv4Address | IPv6Address
Mode: TypeAlias = Literal["none", "all", "auto", "spec"]
Direction: TypeAlias = Literal["tcp_in", "udp_in", "tcp_out", "udp_out"]
ProgramMode: TypeAlias = Literal["passt", "pasta"]
Scope: TypeAlias = tuple[Addr | None, str | None]
PortTuple: TypeAlias = tuple[Addr | None, str | None, int, int]

PORT_MIN: Final = 1
PORT_MAX: Final = 65535
EPHEMERAL_DEFAULT: Final = (32768, 60999)  # Linux's default net.ipv4.ip_local_port_range
OPTION_OF: Final[dict[Direction, str]] = {"tcp_in": "-t", "udp_in": "-u", "tcp_out": "-T", "udp_out": "-U"}
_MODES: Final = frozenset(get_args(Mode))
_KEYWORDS: Final = frozenset({"none", "all", "auto"})
_PORTS_THEN_TARGET: Final = re.compile(r"[0-9]+(-[0-9]+)?:")


def _canonical_addr(addr: Addr | None) -> Addr | None:
    """IPv4-mapped IPv6 → IPv4: one spelling per address, and binding ::ffff:a.b.c.d with V6ONLY fails."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _target_problem(bind_addr: Addr | None, target: Addr | None) -> Addr | None:
    """The canonical target address (None for none or unspecified); ConfigError where upstream refuses it."""
    target = _canonical_addr(target)
    if target is None or target.is_unspecified:
        return None
    if target.is_multicast:
        raise ConfigError(f"bad forwarding rule: multicast target address {target}")
    if bind_addr is None:
        any_addr = "0.0.0.0" if target.version == 4 else "[::]"
        raise ConfigError(
            f"bad forwarding rule: dual stack forward to IPv{target.version} address {target} unsupported "
            f"(did you mean {any_addr}/... instead?)"
        )
    if bind_addr.version != target.version:
        raise ConfigError(
            f"bad forwarding rule: forward from IPv{bind_addr.version} ({bind_addr}) "
            f"to IPv{target.version} ({target}) unsupported"
        )
    return target


def _addr_key(addr: Addr | None) -> tuple[int, int]:
    """Sort key: wildcard first, then IPv4, then IPv6."""
    if addr is None:
        return (0, 0)
    return (addr.version, int(addr))


def _scopes_overlap(a: Scope, b: Scope) -> bool:
    """Whether listeners with these scopes could want the same socket (and so cannot share a port)."""
    (addr_a, if_a), (addr_b, if_b) = a, b
    if if_a is not None and if_b is not None and if_a != if_b:
        return False  # SO_BINDTODEVICE on different devices: the kernel keeps them apart
    if addr_a is None or addr_b is None or addr_a == addr_b:
        return True
    return addr_a.version == addr_b.version and (addr_a.is_unspecified or addr_b.is_unspecified)


def _scope_prefix(scope: Scope) -> str:
    addr, ifname = scope
    if addr is None and ifname is None:
        return ""
    return f"{'' if addr is None else addr}{'' if ifname is None else '%' + ifname}/"


def _range_text(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _intervals(ports: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Sorted ports → maximal runs (first, last)."""
    run: list[int] = []
    for port in sorted(ports):
        if run and port == run[1] + 1:
            run[1] = port
            continue
        if run:
            yield (run[0], run[1])
        run = [port, port]
    if run:
        yield (run[0], run[1])


@dataclass(frozen=True, slots=True)
class ForwardRule:
    """Ports [first..last] on (bind_addr, ifname) go to [target_first..] on the other side.

    `bind_addr` None means every address of both families; an unspecified address (0.0.0.0, ::) means every
    address of that family only. `target_addr` None means the guest's own address (or loopback, for -T/-U);
    otherwise connections go to that address on the other side.
    """

    bind_addr: Addr | None
    ifname: str | None
    first: int
    last: int
    target_first: int
    target_addr: Addr | None = None

    def __post_init__(self) -> None:
        if not PORT_MIN <= self.first <= self.last <= PORT_MAX:
            raise ConfigError(f"bad forwarding rule: ports {self.first}-{self.last} not within 1-65535")
        if not PORT_MIN <= self.target_first <= PORT_MAX - (self.last - self.first):
            raise ConfigError(f"bad forwarding rule: target {self.target_first} runs past 65535")
        if self.ifname is not None and (why := _ifname_problem(self.ifname)):
            raise ConfigError(f"bad forwarding rule: interface name {self.ifname!r}: {why}")
        object.__setattr__(self, "bind_addr", _canonical_addr(self.bind_addr))
        object.__setattr__(self, "target_addr", _target_problem(self.bind_addr, self.target_addr))

    @property
    def target_last(self) -> int:
        return self.target_first + self.last - self.first

    @property
    def scope(self) -> Scope:
        return (self.bind_addr, self.ifname)

    def item(self) -> str:
        """This rule as one spec item, without its scope prefix: `22`, `80-90:8080-8090`."""
        text = _range_text(self.first, self.last)
        taddr = self.target_addr
        if taddr is not None:
            text += f":{taddr}" if self.target_first == self.first else f":{taddr}/"
        elif self.target_first != self.first:
            text += ":"
        if self.target_first != self.first:
            text += _range_text(self.target_first, self.target_last)
        return text

    def _sort_key(self) -> tuple[int, tuple[int, int], str]:
        return (self.first, _addr_key(self.bind_addr), self.ifname or "")


@dataclass(frozen=True, slots=True)
class Listener:
    """One concrete listening port: what a ListenerSet opens, and what a connection accepted on it maps to."""

    bind_addr: Addr | None
    ifname: str | None
    port: int
    target_port: int
    target_addr: Addr | None = None  # None: the guest's own address (loopback for -T/-U)
    # The id of the rule this port belongs to (core/fwdbook.py; 0: none) and its counters: not part of the
    # value, so a port that only changes rule is no change of sockets (ListenerSet refreshes them).
    rule: int = field(default=0, compare=False)
    tally: FwdTally | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[Addr | None, str | None, int]:
        """The socket identity: listeners with equal keys share sockets, whatever their target."""
        return (self.bind_addr, self.ifname, self.port)


def _normalize(rules: Iterable[ForwardRule]) -> tuple[ForwardRule, ...]:
    """Sort, and merge rules that continue each other with the same scope and offset."""
    by_scope: dict[Scope, list[ForwardRule]] = {}
    for rule in rules:
        by_scope.setdefault(rule.scope, []).append(rule)
    merged: list[ForwardRule] = []
    for group in by_scope.values():
        group.sort(key=ForwardRule._sort_key)
        cur = group[0]
        for nxt in group[1:]:
            if (
                nxt.first == cur.last + 1
                and nxt.target_first == cur.target_last + 1
                and nxt.target_addr == cur.target_addr
            ):
                cur = ForwardRule(
                    cur.bind_addr, cur.ifname, cur.first, nxt.last, cur.target_first, cur.target_addr
                )
            else:
                merged.append(cur)
                cur = nxt
        merged.append(cur)
    merged.sort(key=ForwardRule._sort_key)
    return tuple(merged)


def _first_conflict(rules: tuple[ForwardRule, ...]) -> tuple[ForwardRule, ForwardRule, int] | None:
    """Two rules that would need the same socket, and the lowest such port; None if there are none."""
    scopes = list(dict.fromkeys(r.scope for r in rules))
    by_scope = {s: [r for r in rules if r.scope == s] for s in scopes}
    best: tuple[ForwardRule, ForwardRule, int] | None = None
    for i, sa in enumerate(scopes):
        for sb in scopes[i:]:
            if not _scopes_overlap(sa, sb):
                continue
            pool = (
                by_scope[sa] if sa == sb else sorted(by_scope[sa] + by_scope[sb], key=ForwardRule._sort_key)
            )
            reach: ForwardRule | None = None
            for rule in pool:
                if reach is not None and rule.first <= reach.last:
                    if best is None or rule.first < best[2]:
                        best = (reach, rule, rule.first)
                    break
                if reach is None or rule.last > reach.last:
                    reach = rule
    return best


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """Which ports one protocol forwards in one direction. Canonical and valid by construction.

    mode "none": nothing. "auto": ports bound on the other side (found by a scanner, not here). "spec":
    exactly `rules`. "all": every port except `excluded` and the ephemeral range, on the scope
    (`bind_addr`, `ifname`); a scoped "all" needs at least one exclusion, because only exclusion-only specs
    can write it.
    """

    mode: Mode
    rules: tuple[ForwardRule, ...] = ()
    excluded: frozenset[int] = field(default_factory=frozenset)
    bind_addr: Addr | None = None
    ifname: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"bad port forwarding mode {self.mode!r}")
        if self.mode != "spec" and self.rules:
            raise ConfigError(f"port forwarding mode '{self.mode}' takes no rules")
        if self.mode == "spec" and not self.rules:
            raise ConfigError("port forwarding mode 'spec' needs at least one rule")
        if self.mode != "all" and (self.excluded or self.bind_addr is not None or self.ifname is not None):
            raise ConfigError(f"port forwarding mode '{self.mode}' takes no exclusions, address or interface")
        if self.mode == "all":
            if any(not PORT_MIN <= p <= PORT_MAX for p in self.excluded):
                raise ConfigError("excluded ports must be within 1-65535")
            if self.ifname is not None and (why := _ifname_problem(self.ifname)):
                raise ConfigError(f"bad interface name {self.ifname!r}: {why}")
            if (self.bind_addr is not None or self.ifname is not None) and not self.excluded:
                raise ConfigError("'all' on an address or interface needs at least one exclusion")
            object.__setattr__(self, "bind_addr", _canonical_addr(self.bind_addr))
            object.__setattr__(self, "excluded", frozenset(self.excluded))
        if self.mode == "spec":
            rules = _normalize(self.rules)
            if conflict := _first_conflict(rules):
                a, b, port = conflict
                raise ConfigError(
                    f"overlapping rules '{_scope_prefix(a.scope)}{a.item()}' and "
                    f"'{_scope_prefix(b.scope)}{b.item()}' (port {port})"
                )
            object.__setattr__(self, "rules", rules)

    @property
    def scope(self) -> Scope:
        return (self.bind_addr, self.ifname)

    def ports(self, ephemeral: tuple[int, int] | None = EPHEMERAL_DEFAULT) -> list[PortTuple]:
        """The concrete listeners as (bind_addr, ifname, port, target_port), sorted by port.

        `ephemeral` is the host's local port range (inclusive), left out of "all"; None leaves nothing out.
        """
        if self.mode == "spec":
            out = [
                (r.bind_addr, r.ifname, p, r.target_first + p - r.first)
                for r in self.rules
                for p in range(r.first, r.last + 1)
            ]
            out.sort(key=lambda t: t[2])
            return out
        if self.mode == "all":
            lo, hi = ephemeral if ephemeral is not None else (0, -1)
            skip = self.excluded
            addr, ifname = self.bind_addr, self.ifname
            return [
                (addr, ifname, p, p)
                for p in range(PORT_MIN, PORT_MAX + 1)
                if not lo <= p <= hi and p not in skip
            ]
        return []

    def listeners(self, ephemeral: tuple[int, int] | None = EPHEMERAL_DEFAULT) -> set[Listener]:
        """`ports()` as Listener values (with the rules' target addresses), for `diff` and ListenerSet."""
        if self.mode == "spec":
            return {
                Listener(r.bind_addr, r.ifname, p, r.target_first + p - r.first, r.target_addr)
                for r in self.rules
                for p in range(r.first, r.last + 1)
            }
        return {Listener(a, i, p, t) for a, i, p, t in self.ports(ephemeral)}

    def target(self, port: int, bind_addr: Addr | None = None) -> int | None:
        """Where a connection to `port` (on `bind_addr`, if known) goes; None if the port is not forwarded.

        A rule for exactly `bind_addr` wins over a wildcard one. "auto" answers None: the scanner decides.
        "all" does not know the ephemeral range here, so it answers for every port not excluded.
        """
        addr = _canonical_addr(bind_addr)
        if self.mode == "all":
            if addr is not None and not _scopes_overlap(self.scope, (addr, None)):
                return None
            return port if PORT_MIN <= port <= PORT_MAX and port not in self.excluded else None
        if self.mode != "spec":
            return None
        fallback: int | None = None
        for rule in self.rules:
            if rule.first > port:
                break
            if port > rule.last:
                continue
            mapped = rule.target_first + port - rule.first
            if addr is None or rule.bind_addr == addr:
                return mapped
            if fallback is None and _scopes_overlap(rule.scope, (addr, None)):
                fallback = mapped
        return fallback

    def to_spec(self) -> str:
        """A canonical spec; `parse_spec` (with the flags this mode needs) gives back an equal policy."""
        if self.mode in ("none", "auto"):
            return self.mode
        if self.mode == "all":
            if not self.excluded:
                return "all"
            items = ",".join("~" + _range_text(a, b) for a, b in _intervals(self.excluded))
            return _scope_prefix(self.scope) + items
        groups: dict[Scope, list[str]] = {}
        for rule in self.rules:
            groups.setdefault(rule.scope, []).append(rule.item())
        ordered = sorted(groups.items(), key=lambda kv: (_addr_key(kv[0][0]), kv[0][1] or ""))
        return " ".join(_scope_prefix(scope) + ",".join(items) for scope, items in ordered)


NONE: Final = PortPolicy("none")
AUTO: Final = PortPolicy("auto")
ALL: Final = PortPolicy("all")


# ---------------------------------------------------------------------------------------------------------
# Parsing


class _Parser:
    """Accumulates the words of one option's specs, with passt's checks and one-line errors."""

    def __init__(self, option: str, allow_auto: bool, allow_all: bool, allow_scope: bool) -> None:
        self.option = option
        self.allow_auto = allow_auto
        self.allow_all = allow_all
        self.allow_scope = allow_scope
        self.mode: Mode | None = None
        self.first_word = ""
        self.rules: list[ForwardRule] = []
        self.excluded: frozenset[int] = frozenset()
        self.scope: Scope = (None, None)

    def fail(self, what: str) -> ConfigError:
        return ConfigError(f"{self.option}: {what}")

    def set_mode(self, mode: Mode, word: str) -> None:
        if self.mode is not None and (mode != "spec" or self.mode != "spec"):
            raise self.fail(f"'{word}' conflicts with '{self.first_word}'")
        if self.mode is None:
            self.first_word = word
        self.mode = mode

    def port(self, text: str, token: str, item: str) -> int:
        if not token:
            raise self.fail(f"missing port in '{item}'")
        if not text.isascii() or not text.isdigit():
            raise self.fail(f"bad port range '{token}' (not a number)")
        if len(text.lstrip("0")) > 5 or int(text) > PORT_MAX:
            raise self.fail(f"bad port range '{token}' (port above {PORT_MAX})")
        if int(text) == 0:
            raise self.fail(f"bad port range '{token}' (port 0 is not valid)")
        return int(text)

    def range(self, token: str, item: str) -> tuple[int, int]:
        head, dash, tail = token.partition("-")
        first = self.port(head, token, item)
        last = self.port(tail, token, item) if dash else first
        if last < first:
            raise self.fail(f"bad port range '{token}' (start after end)")
        return first, last

    def scope_of(self, prefix: str, word: str) -> Scope:
        if not self.allow_scope:
            raise self.fail(f"address or interface '{prefix}/' not allowed here (only for -t and -u)")
        addr_text, pct, ifname_text = prefix.partition("%")
        ifname = ifname_text if pct else None
        if ifname is not None and (why := _ifname_problem(ifname)):
            raise self.fail(f"bad interface name '{ifname}' in '{word}' ({why})")
        if not addr_text:
            if ifname is None:
                raise self.fail(f"missing address or interface before '/' in '{word}'")
            return (None, ifname)
        try:
            addr: Addr = ip_address(addr_text)
        except ValueError:
            hint = " (write IPv6 addresses without brackets)" if addr_text.startswith("[") else ""
            raise self.fail(f"bad address '{addr_text}' in '{word}'{hint}") from None
        return (_canonical_addr(addr), ifname)

    def word(self, word: str) -> None:
        if word in _KEYWORDS:
            if word == "auto" and not self.allow_auto:
                raise self.fail("'auto' port forwarding is only allowed for pasta")
            if word == "all" and not self.allow_all:
                raise self.fail("'all' port forwarding is only allowed for passt")
            self.set_mode("none" if word == "none" else "all" if word == "all" else "auto", word)
            return
        scope: Scope = (None, None)
        body = word
        if "/" in word:
            prefix, _, rest = word.partition("/")
            try:
                scope, body = self.scope_of(prefix, word), rest
            except ConfigError:
                if not _PORTS_THEN_TARGET.match(word):  # "8080:10.89.0.5/80": the '/' is the target's
                    raise
        items = body.split(",")
        for item in items:
            if not item:
                raise self.fail(f"empty item in '{word}'")

        # Exclusions first: they apply to every range of this spec, wherever they are written.
        excluded: set[int] = set()
        for item in items:
            if not item.startswith("~"):
                continue
            token = item[1:]
            if ":" in token:
                raise self.fail(f"bad exclusion '{item}' (exclusions take no target)")
            first, last = self.range(token, item)
            for port in range(first, last + 1):
                if port in excluded:
                    raise self.fail(f"overlapping exclusion '{item}' (port {port} already excluded)")
            excluded.update(range(first, last + 1))

        forwards = [item for item in items if not item.startswith("~")]
        if not forwards:  # exclusions only: "everything but"
            self.set_mode("all", word)
            self.excluded = frozenset(excluded)
            self.scope = scope
            return
        self.set_mode("spec", word)
        added = 0
        for item in forwards:
            src, colon, dst = item.partition(":")
            first, last = self.range(src, item)
            target_first = first
            target_addr: Addr | None = None
            if colon:
                target_addr, t_range = self.target(dst, item)
                if t_range is not None:
                    t_first, t_last = t_range
                    if t_last - t_first != last - first:
                        raise self.fail(f"bad port mapping '{item}' (ranges differ in length)")
                    target_first = t_first
            try:
                pieces = [
                    ForwardRule(scope[0], scope[1], a, b, target_first + a - first, target_addr)
                    for a, b in _split(first, last, excluded)
                ]
            except ConfigError as exc:
                raise self.fail(f"{str(exc).removeprefix('bad forwarding rule: ')} in '{item}'") from None
            self.check_overlap(pieces, first, last, item)
            self.rules.extend(pieces)
            added += len(pieces)
        if not added:
            raise self.fail(f"'{word}' excludes every port it forwards")

    def target(self, text: str, item: str) -> tuple[Addr | None, tuple[int, int] | None]:
        """What follows ':' in an item: PORTS, TADDR, or TADDR/PORTS (upstream's parse_port_chunk order)."""
        addr_text, slash, ports = text.rpartition("/")
        if not slash:
            if not text or all(c.isdigit() or c == "-" for c in text) or not any(c in text for c in ":."):
                return None, self.range(text, item)
            addr_text = text
        if addr_text.startswith("[") and addr_text.endswith("]"):
            addr_text = addr_text[1:-1]
        try:
            addr: Addr = ip_address(addr_text)
        except ValueError:
            if not slash and ":" in text and "." not in text and not text.startswith("["):
                raise self.fail(f"bad port mapping '{item}' (more than one ':')") from None
            raise self.fail(f"bad target address '{addr_text}' in '{item}'") from None
        return _canonical_addr(addr), (self.range(ports, item) if slash else None)

    def check_overlap(self, pieces: list[ForwardRule], first: int, last: int, item: str) -> None:
        """passt's "Overlapping port specifier", on forwarded (not excluded) ports only.

        Earlier rules are screened against the item's whole span first, so an item split into many pieces
        by exclusions costs a bisection per candidate, not a scan of every piece.
        """
        if not pieces:
            return
        scope = pieces[0].scope
        starts = [p.first for p in pieces]
        for old in self.rules:
            if old.last < first or last < old.first or not _scopes_overlap(old.scope, scope):
                continue
            i = max(bisect_right(starts, old.first) - 1, 0)
            while i < len(pieces) and pieces[i].first <= old.last:
                piece = pieces[i]
                if piece.last >= old.first:
                    port = max(old.first, piece.first)
                    raise self.fail(f"overlapping port specifier '{item}' (port {port} already forwarded)")
                i += 1

    def policy(self) -> PortPolicy:
        if self.mode == "spec":
            return PortPolicy("spec", tuple(self.rules))
        if self.mode == "all":
            return PortPolicy("all", excluded=self.excluded, bind_addr=self.scope[0], ifname=self.scope[1])
        return NONE if self.mode == "none" else AUTO


def _split(first: int, last: int, excluded: set[int]) -> list[tuple[int, int]]:
    """[first..last] minus `excluded`, as runs."""
    if not excluded:
        return [(first, last)]
    return list(_intervals(p for p in range(first, last + 1) if p not in excluded))


def parse_spec(
    spec: str,
    *,
    option: str = "-t",
    allow_auto: bool = False,
    allow_all: bool = True,
    allow_scope: bool | None = None,
) -> PortPolicy:
    """Parse one option's spec (whitespace-separated specs count as repeated options).

    `allow_scope` None means "as passt": an `ADDR%IF/` prefix is accepted for -t/-u, refused for -T/-U.
    Raises ConfigError with one line naming `option` and the offending token.
    """
    if allow_scope is None:
        allow_scope = option not in ("-T", "-U", "--tcp-ns", "--udp-ns")
    parser = _Parser(option, allow_auto, allow_all, allow_scope)
    words = spec.split()
    if not words:
        raise parser.fail("empty port specifier")
    for word in words:
        parser.word(word)
    return parser.policy()


# ---------------------------------------------------------------------------------------------------------
# Diffing


def diff(
    old: PortPolicy, new: PortPolicy, ephemeral: tuple[int, int] | None = EPHEMERAL_DEFAULT
) -> tuple[set[Listener], set[Listener]]:
    """(to_close, to_open) taking `old`'s listeners to `new`'s.

    A port whose target changed shows up in both sets (old Listener closed, new one opened), as a plain set
    difference; `ListenerSet.apply_diff` recognises the shared socket key and retargets in place, so the
    socket is never closed and no connection attempt is refused in between.
    """
    if old == new:
        return set(), set()
    if old.mode == new.mode == "all" and old.scope == new.scope:
        # Only the exclusions moved: touch those ports, not the ~60k listeners around them.
        lo, hi = ephemeral if ephemeral is not None else (0, -1)
        addr, ifname = old.scope

        def made(ports: frozenset[int]) -> set[Listener]:
            return {Listener(addr, ifname, p, p) for p in ports if not lo <= p <= hi}

        return made(new.excluded - old.excluded), made(old.excluded - new.excluded)
    before, after = old.listeners(ephemeral), new.listeners(ephemeral)
    return before - after, after - before


# ---------------------------------------------------------------------------------------------------------
# The four tables, and run-time changes to them (pesto's add / delete / clear / replace)


def _follow(tcp: PortPolicy) -> PortPolicy:
    """UDP's policy when only TCP's was given: the same ports, without port translation (passt(1))."""
    if tcp.mode != "spec":
        return tcp
    return PortPolicy(
        "spec",
        tuple(ForwardRule(r.bind_addr, r.ifname, r.first, r.last, r.first, r.target_addr) for r in tcp.rules),
    )


def _subtract_rules(rules: tuple[ForwardRule, ...], gone: ForwardRule) -> tuple[list[ForwardRule], int]:
    """`rules` minus the ports forwarded exactly as `gone` says (same scope and offset), and how many."""
    out: list[ForwardRule] = []
    removed = 0
    delta = gone.target_first - gone.first
    for rule in rules:
        same = (
            rule.scope == gone.scope
            and rule.target_first - rule.first == delta
            and rule.target_addr == gone.target_addr
        )
        if not same or rule.last < gone.first or gone.last < rule.first:
            out.append(rule)
            continue
        lo, hi = max(rule.first, gone.first), min(rule.last, gone.last)
        removed += hi - lo + 1
        if rule.first < lo:
            out.append(
                ForwardRule(
                    rule.bind_addr, rule.ifname, rule.first, lo - 1, rule.target_first, rule.target_addr
                )
            )
        if hi < rule.last:
            out.append(
                ForwardRule(
                    rule.bind_addr,
                    rule.ifname,
                    hi + 1,
                    rule.last,
                    rule.target_first + hi + 1 - rule.first,
                    rule.target_addr,
                )
            )
    return out, removed


@dataclass(frozen=True, slots=True)
class ForwardTables:
    """The four policies: tcp_in (-t), udp_in (-u), tcp_out (-T), udp_out (-U); changes return new values.

    In passt mode only the inbound tables exist ("auto" is refused); in pasta mode "all" is refused, as in
    passt's conf.c. The "UDP follows TCP" rule applies when building from options only, not to later changes.
    """

    mode: ProgramMode
    tcp_in: PortPolicy = NONE
    udp_in: PortPolicy = NONE
    tcp_out: PortPolicy = NONE
    udp_out: PortPolicy = NONE

    def __post_init__(self) -> None:
        if self.mode not in ("passt", "pasta"):
            raise ConfigError(f"bad program mode {self.mode!r}")
        for direction, option in OPTION_OF.items():
            policy: PortPolicy = getattr(self, direction)
            if self.mode == "passt" and direction.endswith("_out") and policy.mode != "none":
                raise ConfigError(f"{option}: only valid in pasta mode")
            if self.mode == "passt" and policy.mode == "auto":
                raise ConfigError(f"{option}: 'auto' port forwarding is only allowed for pasta")
            if self.mode == "pasta" and policy == ALL:
                raise ConfigError(f"{option}: 'all' port forwarding is only allowed for passt")

    @classmethod
    def from_options(
        cls,
        t: str | None,
        u: str | None,
        T: str | None,
        U: str | None,
        mode: ProgramMode,
    ) -> ForwardTables:
        """Tables from -t/-u/-T/-U values (repeated options joined with spaces); None means "not given".

        Defaults follow passt's conf.c: passt forwards nothing; pasta uses "auto" for every table it was not
        told about. When -u (or -U) is not given but -t (or -T) is, UDP forwards TCP's ports without
        translation (passt(1): "UDP ports with numbers corresponding to forwarded TCP port numbers are
        forwarded too").
        """
        base = cls(mode)
        if mode == "passt":
            for opt, value in (("-T", T), ("-U", U)):
                if value is not None:
                    raise ConfigError(f"{opt}: only valid in pasta mode")
        default = NONE if mode == "passt" else AUTO
        tcp_in = base._parse("tcp_in", t) if t is not None else default
        udp_in = (
            base._parse("udp_in", u) if u is not None else (_follow(tcp_in) if t is not None else default)
        )
        tcp_out = base._parse("tcp_out", T) if T is not None else default
        udp_out = (
            base._parse("udp_out", U) if U is not None else (_follow(tcp_out) if T is not None else default)
        )
        return cls(mode, tcp_in, udp_in, tcp_out, udp_out)

    def policy(self, direction: Direction) -> PortPolicy:
        self._check_direction(direction, changing=False)
        policy: PortPolicy = getattr(self, direction)
        return policy

    def _check_direction(self, direction: str, changing: bool) -> None:
        option = OPTION_OF.get(direction)  # type: ignore[call-overload]
        if option is None:
            raise ConfigError(f"bad forwarding direction {direction!r}")
        if changing and self.mode == "passt" and direction.endswith("_out"):
            raise ConfigError(f"{option}: only valid in pasta mode")

    def _parse(self, direction: Direction, spec: str) -> PortPolicy:
        self._check_direction(direction, changing=True)
        pasta = self.mode == "pasta"
        return parse_spec(spec, option=OPTION_OF[direction], allow_auto=pasta, allow_all=not pasta)

    def _with(self, direction: Direction, policy: PortPolicy) -> ForwardTables:
        values = {d: getattr(self, d) for d in OPTION_OF}
        values[direction] = policy
        return ForwardTables(self.mode, **values)

    def replace(self, direction: Direction, spec: str) -> ForwardTables:
        """The table for `direction` becomes exactly `spec` (pesto's default)."""
        return self._with(direction, self._parse(direction, spec))

    def clear(self, direction: Direction) -> ForwardTables:
        """Forward nothing in `direction`."""
        self._check_direction(direction, changing=False)
        return self._with(direction, NONE)

    def add(self, direction: Direction, spec: str) -> ForwardTables:
        """Add the rules of `spec`; a port already forwarded (on an overlapping scope) is an error."""
        opt = OPTION_OF[direction]
        extra = self._parse(direction, spec)
        cur = self.policy(direction)
        if extra.mode == "none":
            return self
        if cur.mode == "none":
            return self._with(direction, extra)
        if cur.mode != "spec" or extra.mode != "spec":
            raise ConfigError(f"{opt}: cannot add '{spec}' to '{cur.to_spec()}'")
        if conflict := _first_conflict(_normalize(cur.rules + extra.rules)):
            first_rule, second_rule, port = conflict
            added = second_rule if second_rule in extra.rules else first_rule
            shown = _scope_prefix(added.scope) + added.item()
            raise ConfigError(f"{opt}: overlapping port specifier '{shown}' (port {port} already forwarded)")
        return self._with(direction, PortPolicy("spec", cur.rules + extra.rules))

    def delete(self, direction: Direction, spec: str) -> ForwardTables:
        """Remove the ports of `spec`, which must be forwarded exactly so (same scope and target).

        Deleting from "all" adds exclusions; deleting "all"/"auto" itself needs the same spec as the table.
        """
        opt = OPTION_OF[direction]
        gone = self._parse(direction, spec)
        cur = self.policy(direction)
        if gone.mode == "none":
            return self
        if gone.mode in ("all", "auto"):
            if gone != cur:
                raise ConfigError(f"{opt}: cannot delete '{spec}' from '{cur.to_spec()}'")
            return self._with(direction, NONE)
        if cur.mode == "all":
            ports: set[int] = set()
            for rule in gone.rules:
                if rule.scope != cur.scope or rule.target_first != rule.first or rule.target_addr is not None:
                    raise ConfigError(f"{opt}: cannot delete '{rule.item()}' (not forwarded as given)")
                span = set(range(rule.first, rule.last + 1))
                if span & cur.excluded:
                    raise ConfigError(f"{opt}: cannot delete '{rule.item()}' (not forwarded)")
                ports |= span
            return self._with(
                direction, PortPolicy("all", (), cur.excluded | ports, cur.bind_addr, cur.ifname)
            )
        if cur.mode != "spec":
            raise ConfigError(f"{opt}: cannot delete '{spec}' from '{cur.to_spec()}'")
        rules = cur.rules
        for rule in gone.rules:
            kept, removed = _subtract_rules(rules, rule)
            if removed != rule.last - rule.first + 1:
                shown = _scope_prefix(rule.scope) + rule.item()
                raise ConfigError(f"{opt}: cannot delete '{shown}' (not forwarded as given)")
            rules = tuple(kept)
        return self._with(direction, PortPolicy("spec", rules) if rules else NONE)

    def to_specs(self) -> dict[Direction, str]:
        """Each table as a canonical spec, keyed by direction (for logs and the control API)."""
        return {d: self.policy(d).to_spec() for d in OPTION_OF}
