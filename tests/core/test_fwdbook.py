"""Rule ids (core/fwdbook.py): which changes keep an id, which make new ones; ids are never reused."""

from __future__ import annotations

import pytest

from passtd.dataplane.core.flowtable import FwdTally
from passtd.dataplane.core.fwd import ForwardTables
from passtd.dataplane.core.fwdbook import RuleBook
from passtd.errors import ConfigError


def spans(book: RuleBook, direction: str = "tcp_in") -> dict[int, str]:
    """id → the entry's item ("80", "81-82:91-92", or the mode of an all/auto table)."""
    return {e.id: e.rule.item() if e.rule else e.mode for e in book.of(direction)}  # type: ignore[arg-type]


def test_add_keeps_old_ids_and_gives_the_new_ports_one_id() -> None:
    t0 = ForwardTables("passt").replace("tcp_in", "80")
    b0 = RuleBook().reconcile(t0)
    assert spans(b0) == {1: "80"}
    t1 = t0.add("tcp_in", "81-82")
    assert t1.tcp_in.to_spec() == "80-82"  # canonical tables merge...
    b1 = b0.reconcile(t1)
    assert spans(b1) == {1: "80", 2: "81-82"}  # ...the book does not
    assert b1.reconcile(t1) == b1  # the same tables again: nothing changes, no id spent


def test_delete_part_of_an_entry_ends_its_id_and_ids_are_never_reused() -> None:
    t = ForwardTables("passt").replace("tcp_in", "80-85 9000")
    b = RuleBook().reconcile(t)
    assert spans(b) == {1: "80-85", 2: "9000"}
    t = t.delete("tcp_in", "82")
    b = b.reconcile(t)
    assert spans(b) == {2: "9000", 3: "80-81", 4: "83-85"}
    t = b.without(t, [3])
    assert t.tcp_in.to_spec() == "83-85,9000"
    b = b.reconcile(t)
    assert spans(b) == {2: "9000", 4: "83-85"}
    b = b.reconcile(t.replace("tcp_in", "80-81 83-85 9000"))
    assert spans(b) == {2: "9000", 4: "83-85", 5: "80-81"}  # 80-81 again: a new id, not 3


def test_changed_target_is_a_new_rule_and_unknown_id_is_refused() -> None:
    t = ForwardTables("passt").replace("tcp_in", "80:8080")
    b = RuleBook().reconcile(t)
    b2 = b.reconcile(t.replace("tcp_in", "80:8081"))
    assert spans(b2) == {2: "80:8081"}
    with pytest.raises(ConfigError, match="no forwarding rule with id 7"):
        b2.without(t, [7])


def test_all_and_auto_tables_are_one_rule_whose_id_survives_exclusions() -> None:
    t = ForwardTables("passt").replace("tcp_in", "all")
    b = RuleBook().reconcile(t)
    assert spans(b) == {1: "all"}
    b = b.reconcile(t.delete("tcp_in", "22"))
    assert spans(b) == {1: "all"}
    t = ForwardTables("pasta").replace("udp_out", "auto")
    b = b.reconcile(t)
    assert spans(b, "udp_out") == {2: "auto"} and spans(b) == {}
    assert b.without(t, [2]).udp_out.mode == "none"


def test_listeners_carry_their_rule_id_and_one_tally_per_rule() -> None:
    t = ForwardTables("passt").replace("tcp_in", "80 127.0.0.1/90-91:100-101")
    b = RuleBook().reconcile(t)
    tallies: dict[int, FwdTally] = {}
    listeners = b.listeners(t, "tcp_in", None, tallies)
    by_port = {lst.port: lst for lst in listeners}
    assert {p: (lst.rule, lst.target_port) for p, lst in by_port.items()} == {
        80: (1, 80),
        90: (2, 100),
        91: (2, 101),
    }
    assert by_port[90].tally is by_port[91].tally is tallies[2]
    assert by_port[80].tally is tallies[1]
    # Equal to the policy's own listeners but for the ids: the diff of sockets is the same.
    assert {lst.key for lst in listeners} == {lst.key for lst in t.tcp_in.listeners(None)}


def test_many_rules_have_no_cap() -> None:
    spec = ",".join(str(p) for p in range(20000, 21000, 2))  # 500 separate rules
    t = ForwardTables("passt").replace("tcp_in", spec)
    b = RuleBook().reconcile(t)
    assert len(b.of("tcp_in")) == 500 and b.next_id == 501
    assert len(b.listeners(t, "tcp_in", None, {})) == 500
