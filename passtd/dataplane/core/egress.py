"""Egress rules: which guest-initiated flows (TCP, UDP, ICMP echo) may leave, decided once per new flow.

A policy is an immutable ordered list of allow/deny rules plus a default action. A rule matches on the
destination prefix (IPv4 or IPv6; none: any destination of either family), the protocol (tcp, udp, icmp or
any) and, for tcp and udp, port ranges (none: every port). The first rule that matches decides; when none
does, the default does.

The destination is the address AS THE GUEST SEES IT, before passtd maps it: the gateway (the
--map-host-loopback address) stands for the host's loopback, so denying the gateway denies the host, and a
--dns-forward address is matched as itself, not as the resolver it is relayed to. Rules never see the
host-side target, so one rule list means the same thing whatever the mapping options are.

`Egress` is the one mutable holder the cores share: `policy` is swapped as one reference, so a new flow is
decided by the old list or the new one, never a mix; with no rules and "allow" by default it is None, and
admitting a flow costs one attribute check. The counters (matches per rule id, the default's, denials per
protocol) live beside the policy, not in it, so swapping keeps the counts of the rules that stay (by id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Final

from passtd.dataplane.core.flowtable import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Flow, key_addr

PROTO_ANY: Final = 0
PROTO_BY_NAME: Final[dict[str, int]] = {
    "any": PROTO_ANY,
    "tcp": PROTO_TCP,
    "udp": PROTO_UDP,
    "icmp": PROTO_ICMP,
}
PROTO_NAMES: Final[dict[int, str]] = {v: k for k, v in PROTO_BY_NAME.items()}
ACTIONS: Final = ("allow", "deny")
MAX_RULES: Final = 4096  # a list is walked per new flow: bounded so a hostile client cannot make it slow
MAX_PORT_RANGES: Final = 64
DEFAULT_ID: Final = 0  # "the default action matched" in `match` results and events; rule ids start at 1


class EgressError(ValueError):
    """A bad rule or policy; `field` names what is wrong (the control plane's INVALID_ARGUMENT names it)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True, slots=True)
class EgressRule:
    """One rule. `network` None: any destination; `ports` () : every port (tcp and udp rules only)."""

    rule_id: int
    allow: bool
    network: IPv4Network | IPv6Network | None = None
    proto: int = PROTO_ANY
    ports: tuple[tuple[int, int], ...] = ()

    @property
    def action(self) -> str:
        return "allow" if self.allow else "deny"

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES[self.proto]


# A rule compiled for matching: (family 4/6/0 for any, mask, network bits, proto, ports, allow, rule id).
_Compiled = tuple[int, int, int, int, tuple[tuple[int, int], ...], bool, int]


def _compile(rule: EgressRule) -> _Compiled:
    net = rule.network
    if net is None:
        return (0, 0, 0, rule.proto, rule.ports, rule.allow, rule.rule_id)
    bits = 32 if net.version == 4 else 128
    mask = ((1 << bits) - 1) ^ ((1 << (bits - net.prefixlen)) - 1)
    return (net.version, mask, int(net.network_address), rule.proto, rule.ports, rule.allow, rule.rule_id)


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """An ordered rule list and the default action; immutable, shared by reference, swapped whole."""

    rules: tuple[EgressRule, ...] = ()
    default_allow: bool = True
    _compiled: tuple[_Compiled, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(_compile(r) for r in self.rules))

    @property
    def trivial(self) -> bool:
        """Nothing to decide: every flow is allowed without looking."""
        return not self.rules and self.default_allow

    def match(self, proto: int, dst: bytes, dport: int) -> tuple[bool, int]:
        """(allowed, id of the deciding rule or DEFAULT_ID) for a new flow to `dst` (packed, as the guest
        addressed it) port `dport` (ignored for icmp). First match wins."""
        family = 4 if len(dst) == 4 else 6
        value = int.from_bytes(dst, "big")
        for rfam, mask, net, rproto, ports, allow, rule_id in self._compiled:
            if rproto and rproto != proto:
                continue
            if rfam and (rfam != family or value & mask != net):
                continue
            if ports:
                for first, last in ports:
                    if first <= dport <= last:
                        break
                else:
                    continue
            return allow, rule_id
        return self.default_allow, DEFAULT_ID

    def ids(self) -> list[int]:
        return [r.rule_id for r in self.rules]

    def with_rule(self, rule: EgressRule, position: int = -1) -> EgressPolicy:
        """A new policy with `rule` inserted at `position` (0 first; -1 or past the end: last)."""
        if rule.rule_id in self.ids():
            raise EgressError("rule.id", f"rule {rule.rule_id} exists already")
        if len(self.rules) >= MAX_RULES:
            raise EgressError("rule", f"at most {MAX_RULES} rules")
        rules = list(self.rules)
        if position < 0 or position > len(rules):
            position = len(rules)
        rules.insert(position, rule)
        return replace(self, rules=tuple(rules))

    def without_rule(self, rule_id: int) -> EgressPolicy:
        """A new policy without the rule of that id; EgressError when there is none."""
        rules = tuple(r for r in self.rules if r.rule_id != rule_id)
        if len(rules) == len(self.rules):
            raise EgressError("id", f"no egress rule {rule_id}")
        return replace(self, rules=rules)

    def with_default(self, allow: bool) -> EgressPolicy:
        return replace(self, default_allow=allow)


def make_policy(rules: Iterable[EgressRule], default_allow: bool = True) -> EgressPolicy:
    """A policy from rules with distinct positive ids, checked (EgressError names the offending rule)."""
    listed = tuple(rules)
    if len(listed) > MAX_RULES:
        raise EgressError("rules", f"at most {MAX_RULES} rules")
    seen: set[int] = set()
    for i, rule in enumerate(listed):
        if rule.rule_id <= 0:
            raise EgressError(f"rules[{i}].id", "rule ids are positive")
        if rule.rule_id in seen:
            raise EgressError(f"rules[{i}].id", f"duplicate rule id {rule.rule_id}")
        seen.add(rule.rule_id)
    return EgressPolicy(listed, default_allow)


def assign_ids(requested: Iterable[int], first_free: int = 1) -> list[int]:
    """Ids for a list of rules: a requested id (> 0) is kept, a 0 gets the next number from `first_free` on
    that no rule of the list asks for (duplicates among the requested ones are left to `make_policy`)."""
    wanted = list(requested)
    taken = set(wanted)
    out = []
    n = first_free
    for rule_id in wanted:
        if rule_id <= 0:
            while n in taken:
                n += 1
            rule_id = n
            n += 1
        out.append(rule_id)
    return out


# -- parsing (shared by the control API and the config file) ----------------------------------------------


def _quote(text: str, limit: int = 100) -> str:
    """repr(text) cut to `limit` characters: a hostile 100 kB value must not come back whole in an error."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def parse_action(text: str, field_name: str = "action") -> bool:
    """ "allow" → True, "deny" → False."""
    word = text.strip().lower()
    if word not in ACTIONS:
        raise EgressError(field_name, f"{_quote(text)} is not allow or deny")
    return word == "allow"


def parse_proto(text: str, field_name: str = "protocol") -> int:
    word = text.strip().lower() or "any"
    if word not in PROTO_BY_NAME:
        raise EgressError(field_name, f"{_quote(text)} is not tcp, udp, icmp or any")
    return PROTO_BY_NAME[word]


def parse_network(text: str, field_name: str = "destination") -> IPv4Network | IPv6Network | None:
    """A prefix ("192.0.2.0/24", "2001:db8::/32") or an address (a /32 or /128); "" or "any": any."""
    word = text.strip()
    if word in ("", "any"):
        return None
    try:
        return ip_network(word, strict=True)
    except ValueError as exc:
        raise EgressError(
            field_name, f"{_quote(text)} is not an IPv4 or IPv6 prefix ({str(exc)[:160]})"
        ) from None


def parse_ports(text: str, field_name: str = "ports") -> tuple[tuple[int, int], ...]:
    """ "22", "8000-8080", "22,80,443,8000-8080" → ranges (first, last); "" → () (every port)."""
    ranges: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first_s, dash, last_s = part.partition("-")
        try:
            first = int(first_s)
            last = int(last_s) if dash else first
        except ValueError:
            raise EgressError(field_name, f"{_quote(part)} is not a port or a range first-last") from None
        ranges.append((first, last))
    return check_ports(ranges, field_name)


def check_ports(ranges: Iterable[tuple[int, int]], field_name: str = "ports") -> tuple[tuple[int, int], ...]:
    listed = tuple(ranges)
    if len(listed) > MAX_PORT_RANGES:
        raise EgressError(field_name, f"at most {MAX_PORT_RANGES} port ranges")
    for first, last in listed:
        if not (1 <= first <= 65535 and 1 <= last <= 65535):
            raise EgressError(field_name, f"port {first if not 1 <= first <= 65535 else last} is not 1-65535")
        if first > last:
            raise EgressError(field_name, f"range {first}-{last} runs backwards")
    return listed


def make_rule(
    rule_id: int,
    allow: bool,
    network: IPv4Network | IPv6Network | None,
    proto: int,
    ports: tuple[tuple[int, int], ...],
) -> EgressRule:
    """A checked rule: ports only with tcp or udp (echo has none, and "any" would be ambiguous)."""
    if proto not in PROTO_NAMES:
        raise EgressError("protocol", f"unknown protocol {proto}")
    if ports and proto not in (PROTO_TCP, PROTO_UDP):
        raise EgressError("ports", "port ranges need protocol tcp or udp")
    return EgressRule(rule_id, allow, network, proto, ports)


# -- the shared holder ------------------------------------------------------------------------------------

# Called for each denied flow with a Flow describing it (id 0, in no table) and the reason; the dataplane
# turns it into a "denied" FlowEvent, built only while someone watches.
OnDenied = Callable[[Flow, str], None]


class Egress:
    """The live policy (None when trivial) and its counters; the cores call `check` for each new flow."""

    def __init__(self) -> None:
        self.policy: EgressPolicy | None = None
        self._current = EgressPolicy()
        self.next_id = 1
        self.matches: dict[int, int] = {}  # rule id → new flows it decided (DEFAULT_ID: the default)
        self.denied: dict[int, int] = {PROTO_TCP: 0, PROTO_UDP: 0, PROTO_ICMP: 0}
        self.reset_flows = 0  # existing flows closed because a new list denied them
        self.on_denied: OnDenied | None = None

    @property
    def current(self) -> EgressPolicy:
        """The policy in force, trivial or not."""
        return self._current

    def set(self, policy: EgressPolicy) -> None:
        """Swap the policy (one reference: a flow is decided by the old or the new list). Counters of rule
        ids that remain are kept, the others dropped; `next_id` (the first id assigned to a rule that asks
        for none) only grows, so an assigned id is never handed out twice."""
        keep = set(policy.ids())
        keep.add(DEFAULT_ID)
        self.matches = {k: v for k, v in self.matches.items() if k in keep}
        if policy.rules:
            self.next_id = max(self.next_id, max(policy.ids()) + 1)
        self._current = policy
        self.policy = None if policy.trivial else policy

    def check(self, proto: int, v6: bool, src: bytes, sport: int, dst: bytes, dport: int, now: float) -> bool:
        """Decide a new guest flow (callers check `policy is not None` first); count it; tell the watcher
        of a denial with a Flow that describes it."""
        policy = self.policy
        if policy is None:
            return True
        allowed, rule_id = policy.match(proto, dst, dport)
        self.matches[rule_id] = self.matches.get(rule_id, 0) + 1
        if allowed:
            return True
        self.denied[proto] = self.denied.get(proto, 0) + 1
        if self.on_denied is not None:
            key = (proto, key_addr(dst), dport, sport)
            flow = Flow(0, proto, key, now, now, guest_addr=bytes(src), guest_port=sport,
                        remote_addr=bytes(dst), remote_port=dport, host_fds=0)  # fmt: skip
            self.on_denied(flow, denial_reason(rule_id))
        return False

    def would_deny(self, proto: int, dst: bytes, dport: int) -> bool:
        """Whether the policy in force denies such a flow, without counting (for resetting existing ones)."""
        policy = self.policy
        return policy is not None and not policy.match(proto, dst, dport)[0]

    @property
    def denied_total(self) -> int:
        return sum(self.denied.values())


def denial_reason(rule_id: int) -> str:
    """The reason a denied flow's event carries: "egress_denied:rule=3" or "egress_denied:default"."""
    return f"egress_denied:rule={rule_id}" if rule_id != DEFAULT_ID else "egress_denied:default"
