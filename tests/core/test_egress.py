"""Egress rules, pure: parsing, first match wins, counters kept across swaps, and a reference model."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passtd.dataplane.core.egress import (
    DEFAULT_ID,
    PROTO_ANY,
    Egress,
    EgressError,
    EgressRule,
    assign_ids,
    make_policy,
    make_rule,
    parse_action,
    parse_network,
    parse_ports,
    parse_proto,
)
from passtd.dataplane.core.flowtable import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Flow

V4 = IPv4Address("192.0.2.7").packed
V4_OTHER = IPv4Address("198.51.100.1").packed
V6 = IPv6Address("2001:db8::7").packed


def rule(rule_id: int, allow: bool, net: str = "", proto: str = "any", ports: str = "") -> EgressRule:
    return make_rule(rule_id, allow, parse_network(net), parse_proto(proto), parse_ports(ports))


def test_first_match_wins_and_default() -> None:
    policy = make_policy(
        [
            rule(1, True, "192.0.2.0/24", "tcp", "443"),
            rule(2, False, "192.0.2.0/24"),
            rule(3, True, "2001:db8::/32"),
        ],
        default_allow=False,
    )
    assert policy.match(PROTO_TCP, V4, 443) == (True, 1)
    assert policy.match(PROTO_TCP, V4, 80) == (False, 2)
    assert policy.match(PROTO_UDP, V4, 443) == (False, 2)
    assert policy.match(PROTO_ICMP, V4, 0) == (False, 2)
    assert policy.match(PROTO_UDP, V6, 53) == (True, 3)
    assert policy.match(PROTO_TCP, V4_OTHER, 443) == (False, DEFAULT_ID)


def test_families_never_cross() -> None:
    """An IPv4 prefix never matches an IPv6 destination (not even ::ffff:0:0/96 or 0.0.0.0/0)."""
    policy = make_policy([rule(1, False, "0.0.0.0/0")])
    assert policy.match(PROTO_TCP, V6, 1) == (True, DEFAULT_ID)
    assert policy.match(PROTO_TCP, V4, 1) == (False, 1)
    any_dst = make_policy([rule(1, False)])
    assert any_dst.match(PROTO_TCP, V6, 1) == (False, 1)


def test_port_ranges() -> None:
    policy = make_policy([rule(1, False, "", "udp", "53,1000-2000")])
    assert policy.match(PROTO_UDP, V4, 53)[0] is False
    assert policy.match(PROTO_UDP, V4, 1000)[0] is False
    assert policy.match(PROTO_UDP, V4, 2000)[0] is False
    assert policy.match(PROTO_UDP, V4, 2001)[0] is True
    assert policy.match(PROTO_TCP, V4, 53)[0] is True


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: parse_action("maybe"), "action"),
        (lambda: parse_proto("sctp"), "protocol"),
        (lambda: parse_network("192.0.2.1/24"), "destination"),  # host bits set
        (lambda: parse_network("300.0.0.0/8"), "destination"),
        (lambda: parse_ports("0"), "ports"),
        (lambda: parse_ports("65536"), "ports"),
        (lambda: parse_ports("20-10"), "ports"),
        (lambda: parse_ports("http"), "ports"),
        (lambda: make_rule(1, False, None, PROTO_ICMP, ((1, 2),)), "ports"),
        (lambda: make_rule(1, False, None, PROTO_ANY, ((1, 2),)), "ports"),
        (lambda: make_policy([rule(1, True), rule(1, False)]), "rules[1].id"),
        (lambda: make_policy([EgressRule(0, True)]), "rules[0].id"),
        (lambda: make_policy([rule(1, True)]).without_rule(2), "id"),
        (lambda: make_policy([rule(1, True)]).with_rule(rule(1, True)), "rule.id"),
    ],
)
def test_bad_input_names_the_field(call: object, field: str) -> None:
    with pytest.raises(EgressError) as info:
        call()  # type: ignore[operator]
    assert info.value.field == field


def test_assign_ids_keeps_requested_and_fills_the_gaps() -> None:
    assert assign_ids([0, 0, 0]) == [1, 2, 3]
    assert assign_ids([0, 1, 0]) == [2, 1, 3]
    assert assign_ids([5, 0], first_free=5) == [5, 6]  # never the id another rule of the list asks for
    assert assign_ids([0, 7], first_free=7) == [8, 7]
    assert assign_ids([3, 3]) == [3, 3]  # make_policy refuses it, naming rules[1].id


def test_insert_remove_default() -> None:
    policy = make_policy([rule(1, True), rule(2, False)])
    policy = policy.with_rule(rule(3, False), 0).with_rule(rule(4, True), 99)
    assert policy.ids() == [3, 1, 2, 4]
    assert policy.without_rule(1).ids() == [3, 2, 4]
    assert policy.with_default(False).default_allow is False
    assert policy.ids() == [3, 1, 2, 4]  # immutable: the old object is unchanged


def test_holder_counts_swaps_and_reports_denials() -> None:
    egress = Egress()
    assert egress.current.trivial and egress.policy is None  # trivial: the one attribute check
    denied: list[tuple[Flow, str]] = []
    egress.on_denied = lambda flow, reason: denied.append((flow, reason))
    egress.set(make_policy([rule(1, False, "192.0.2.0/24", "tcp", "22"), rule(2, True, "192.0.2.0/24")]))
    assert egress.policy is egress.current
    assert egress.check(PROTO_TCP, False, b"\x0a\0\0\x02", 40000, V4, 22, 5.0) is False
    assert egress.check(PROTO_TCP, False, b"\x0a\0\0\x02", 40001, V4, 80, 5.0) is True
    assert egress.check(PROTO_UDP, False, b"\x0a\0\0\x02", 40001, V4_OTHER, 53, 5.0) is True
    assert egress.matches == {1: 1, 2: 1, DEFAULT_ID: 1}
    assert egress.denied[PROTO_TCP] == 1 and egress.denied_total == 1
    ((flow, reason),) = denied
    assert (flow.remote_addr, flow.remote_port, flow.guest_port, reason) == (
        V4,
        22,
        40000,
        "egress_denied:rule=1",
    )
    # a swap keeps the counters of ids that remain and never hands an id out again
    egress.set(egress.current.without_rule(1).with_default(False))
    assert egress.matches == {2: 1, DEFAULT_ID: 1}
    assert egress.next_id == 3
    assert egress.would_deny(PROTO_UDP, V4_OTHER, 53) and not egress.would_deny(PROTO_TCP, V4, 22)
    assert egress.matches == {2: 1, DEFAULT_ID: 1}  # would_deny does not count
    egress.set(make_policy([]))
    assert egress.policy is None


# -- a reference model: the policy agrees with a plain reading of "first match wins" -----------------------

_NETS4 = ["192.0.2.0/24", "192.0.2.128/25", "198.51.100.0/24", "0.0.0.0/0", "203.0.113.5/32"]
_NETS6 = ["2001:db8::/32", "2001:db8:1::/48", "::/0", "2001:db8::5/128"]
_ADDRS = ["192.0.2.1", "192.0.2.200", "198.51.100.9", "203.0.113.5", "2001:db8::5", "2001:db8:1::1", "::1"]

rules_st = st.lists(
    st.tuples(
        st.booleans(),
        st.sampled_from(["", *_NETS4, *_NETS6]),
        st.sampled_from(["any", "tcp", "udp", "icmp"]),
        st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 200)), max_size=3),
    ),
    max_size=8,
)


def _model(rules: list[tuple[bool, str, str, list[tuple[int, int]]]], default: bool, proto: str, addr: str,
           port: int) -> bool:  # fmt: skip
    for allow, net, rproto, ports in rules:
        if rproto not in ("any", proto):
            continue
        if net and ip_address(addr) not in ip_network(net):  # a cross-family test is simply False
            continue
        if rproto in ("tcp", "udp") and ports and not any(a <= port <= min(a + n, 65535) for a, n in ports):
            continue
        return allow
    return default


@settings(max_examples=300, deadline=None)
@given(rules_st, st.booleans(), st.sampled_from(["tcp", "udp", "icmp"]), st.sampled_from(_ADDRS),
       st.integers(1, 65535))  # fmt: skip
def test_policy_matches_reference_model(
    rules: list[tuple[bool, str, str, list[tuple[int, int]]]], default: bool, proto: str, addr: str, port: int
) -> None:
    built = []
    model_rules = []
    for i, (allow, net, rproto, spans) in enumerate(rules, start=1):
        ranges = tuple((a, min(a + n, 65535)) for a, n in spans) if rproto in ("tcp", "udp") else ()
        built.append(make_rule(i, allow, parse_network(net), parse_proto(rproto), ranges))
        model_rules.append((allow, net, rproto, spans if ranges else []))
    policy = make_policy(built, default)
    dport = port if proto != "icmp" else 0
    allowed, rule_id = policy.match(parse_proto(proto), ip_address(addr).packed, dport)
    assert allowed == _model(model_rules, default, proto, addr, dport)
    assert rule_id == DEFAULT_ID or built[rule_id - 1].allow == allowed


@settings(max_examples=100, deadline=None)
@given(rules_st, st.sampled_from(_ADDRS), st.integers(1, 65535))
def test_swap_is_whole(
    rules: list[tuple[bool, str, str, list[tuple[int, int]]]], addr: str, port: int
) -> None:
    """After any sequence of swaps a decision equals the one of exactly the policy last set."""
    egress = Egress()
    old = make_policy([rule(1, False)], default_allow=False)
    egress.set(old)
    new_rules = [
        make_rule(i + 10, allow, parse_network(net), parse_proto(rproto), ())
        for i, (allow, net, rproto, _spans) in enumerate(rules)
    ]
    new = make_policy(new_rules, default_allow=True)
    egress.set(new)
    dst = ip_address(addr).packed
    allowed = egress.check(PROTO_TCP, len(dst) == 16, dst, 1, dst, port, 0.0)
    assert allowed == new.match(PROTO_TCP, dst, port)[0]
    assert 1 not in egress.matches


def test_errors_quote_a_huge_value_clipped() -> None:
    with pytest.raises(EgressError) as info:
        parse_network("x" * 100_000)
    assert len(str(info.value)) < 400
