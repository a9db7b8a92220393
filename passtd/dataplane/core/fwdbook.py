"""Stable ids for forwarding rules, kept across every change to the tables.

`ForwardTables` (core/fwd.py) is canonical: adjacent ranges merge, so `add 81` to `80` gives `80-81` and the
rule a caller added cannot be told apart from the one it joined. The `RuleBook` keeps the rules as they were
added, each with an id that is never reused in a daemon's life, beside the tables they make up: the union of
a direction's entries is exactly its policy.

What keeps an id, whatever changed the tables (gRPC, pesto, SIGHUP):

* a "spec" entry keeps its id while every port it names is still forwarded exactly as before (same scope,
  target port and target address); otherwise it goes, and what is left of the new rules becomes new
  entries, one per maximal run, with fresh ids. So `add` gives the added ports a new id and leaves the old
  ones alone; `delete` of part of an entry ends that id and gives the rest a new one.
* an "all" or "auto" table is one entry, whose id lasts while the table stays in that mode (on the same
  scope); exclusions added to "all" keep it.

Pure: no sockets, no clock. `Forwarding` (io/forwarding.py) holds the book with the tables.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from passtd.dataplane.core.flowtable import FwdTally
from passtd.dataplane.core.fwd import (
    NONE,
    OPTION_OF,
    Direction,
    ForwardRule,
    ForwardTables,
    Listener,
    PortPolicy,
    Scope,
    _subtract_rules,
)
from passtd.errors import ConfigError

DIRECTIONS: tuple[Direction, ...] = tuple(OPTION_OF)


@dataclass(frozen=True, slots=True)
class RuleEntry:
    """One rule with its id: `rule` for mode "spec", None for a whole "all"/"auto" table (`mode`)."""

    id: int
    direction: Direction
    mode: str
    rule: ForwardRule | None = None
    scope: Scope = (None, None)  # "all": the table's scope, which keeps the id only while it stays


def _runs(outer: ForwardRule, inside: list[ForwardRule]) -> list[ForwardRule]:
    """`outer` minus the (non-overlapping, contained) `inside` rules, as rules with outer's mapping."""
    out: list[ForwardRule] = []
    cursor = outer.first
    for rule in sorted(inside, key=lambda r: r.first):
        if rule.first > cursor:
            out.append(_piece(outer, cursor, rule.first - 1))
        cursor = rule.last + 1
    if cursor <= outer.last:
        out.append(_piece(outer, cursor, outer.last))
    return out


def _piece(outer: ForwardRule, first: int, last: int) -> ForwardRule:
    target = outer.target_first + first - outer.first
    return ForwardRule(outer.bind_addr, outer.ifname, first, last, target, outer.target_addr)


@dataclass(frozen=True, slots=True)
class RuleBook:
    """Every rule of the four tables with its id; `next_id` is the next never-used id."""

    entries: tuple[RuleEntry, ...] = ()
    next_id: int = 1

    def of(self, direction: Direction) -> tuple[RuleEntry, ...]:
        return tuple(e for e in self.entries if e.direction == direction)

    def by_id(self, rule_id: int) -> RuleEntry | None:
        for entry in self.entries:
            if entry.id == rule_id:
                return entry
        return None

    def ids(self) -> frozenset[int]:
        return frozenset(e.id for e in self.entries)

    def reconcile(self, tables: ForwardTables) -> RuleBook:
        """The book for `tables`: entries still forwarded as they were keep their ids (see the module)."""
        next_id = self.next_id
        out: list[RuleEntry] = []
        for direction in DIRECTIONS:
            policy = tables.policy(direction)
            old = self.of(direction)
            if policy.mode == "none":
                continue
            if policy.mode in ("all", "auto"):
                same = [e for e in old if e.mode == policy.mode and e.scope == policy.scope]
                if same:
                    out.append(same[0])
                else:
                    out.append(RuleEntry(next_id, direction, policy.mode, None, policy.scope))
                    next_id += 1
                continue
            kept, fresh = _reconcile_spec(policy, [e for e in old if e.rule is not None])
            out += kept
            for rule in fresh:
                out.append(RuleEntry(next_id, direction, "spec", rule))
                next_id += 1
        order = {d: i for i, d in enumerate(DIRECTIONS)}
        out.sort(key=lambda e: (order[e.direction], e.rule.first if e.rule else 0, e.id))
        return RuleBook(tuple(out), next_id)

    def without(self, tables: ForwardTables, ids: Iterable[int]) -> ForwardTables:
        """`tables` without the rules of `ids` (all in this book, else ConfigError naming the first
        unknown); an "all"/"auto" id clears its table."""
        for rule_id in ids:
            entry = self.by_id(rule_id)
            if entry is None:
                raise ConfigError(f"no forwarding rule with id {rule_id}")
            policy = tables.policy(entry.direction)
            if entry.rule is None or policy.mode != "spec":
                new_policy = NONE
            else:
                rules, removed = _subtract_rules(policy.rules, entry.rule)
                assert removed == entry.rule.last - entry.rule.first + 1, "book out of step with tables"
                new_policy = PortPolicy("spec", tuple(rules)) if rules else NONE
            tables = tables._with(entry.direction, new_policy)
        return tables

    def listeners(
        self,
        tables: ForwardTables,
        direction: Direction,
        ephemeral: tuple[int, int] | None,
        tallies: dict[int, FwdTally],
    ) -> set[Listener]:
        """`direction`'s listeners, each with its rule's id and counters (made in `tallies` as needed)."""
        policy = tables.policy(direction)
        entries = self.of(direction)
        if policy.mode == "auto" or not entries:
            return set()
        if policy.mode == "all":
            rule_id = entries[0].id
            tally = tallies.setdefault(rule_id, FwdTally())
            return {Listener(a, i, p, t, None, rule_id, tally) for a, i, p, t in policy.ports(ephemeral)}
        out: set[Listener] = set()
        for entry in entries:
            rule = entry.rule
            assert rule is not None
            tally = tallies.setdefault(entry.id, FwdTally())
            delta = rule.target_first - rule.first
            out.update(
                Listener(rule.bind_addr, rule.ifname, p, p + delta, rule.target_addr, entry.id, tally)
                for p in range(rule.first, rule.last + 1)
            )
        return out


def _reconcile_spec(policy: PortPolicy, old: list[RuleEntry]) -> tuple[list[RuleEntry], list[ForwardRule]]:
    """(old entries still forwarded exactly so, the rest of `policy`'s rules as maximal runs)."""
    by_scope: dict[Scope, list[ForwardRule]] = {}
    for rule in policy.rules:  # canonical: per scope sorted, non-overlapping, maximal
        by_scope.setdefault(rule.scope, []).append(rule)
    starts = {scope: [r.first for r in rules] for scope, rules in by_scope.items()}
    inside: dict[ForwardRule, list[ForwardRule]] = {}
    kept: list[RuleEntry] = []
    for entry in old:
        if entry.rule is None:
            continue
        rule = entry.rule
        group = by_scope.get(rule.scope)
        if not group:
            continue
        i = bisect_right(starts[rule.scope], rule.first) - 1
        if i < 0:
            continue
        outer = group[i]
        if (
            outer.last >= rule.last
            and outer.target_first - outer.first == rule.target_first - rule.first
            and outer.target_addr == rule.target_addr
        ):
            kept.append(entry)
            inside.setdefault(outer, []).append(rule)
    fresh: list[ForwardRule] = []
    for rule in policy.rules:
        fresh += _runs(rule, inside.get(rule, []))
    return kept, fresh
