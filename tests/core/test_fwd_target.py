"""Forwarding rules with a target address (pesto v2's `-t 0.0.0.0/8080:10.89.0.5/80`): policy and TCP core."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from passtd.dataplane.core.fwd import ForwardRule, ForwardTables, Listener, PortPolicy, diff, parse_spec
from passtd.errors import ConfigError
from tests.helpers.tcpfake import FAR4, FakeSock, Rig

A0 = IPv4Address("0.0.0.0")
C5 = IPv4Address("10.89.0.5")


@pytest.mark.parametrize(
    ("spec", "canonical", "listeners"),
    [
        ("0.0.0.0/8080:10.89.0.5/80", "0.0.0.0/8080:10.89.0.5/80", {Listener(A0, None, 8080, 80, C5)}),
        ("0.0.0.0/8080-8081:10.89.0.5", "0.0.0.0/8080-8081:10.89.0.5",
         {Listener(A0, None, 8080, 8080, C5), Listener(A0, None, 8081, 8081, C5)}),
        ("::/80:[fd00::5]/8080", "::/80:fd00::5/8080",
         {Listener(IPv6Address("::"), None, 80, 8080, IPv6Address("fd00::5"))}),
        ("0.0.0.0/80:0.0.0.0/81", "0.0.0.0/80:81", {Listener(A0, None, 80, 81)}),  # unspecified: no target
        ("0.0.0.0/80:::ffff:10.89.0.5", "0.0.0.0/80:10.89.0.5", {Listener(A0, None, 80, 80, C5)}),
    ],
)  # fmt: skip
def test_target_addresses_parse_and_print(spec: str, canonical: str, listeners: set[Listener]) -> None:
    policy = parse_spec(spec)
    assert policy.to_spec() == canonical
    assert parse_spec(canonical) == policy
    assert policy.listeners() == listeners


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "8080:10.89.0.5/80",
            "dual stack forward to IPv4 address 10.89.0.5 unsupported (did you mean 0.0.0.0/",
        ),
        ("0.0.0.0/80:fd00::1", "forward from IPv4 (0.0.0.0) to IPv6 (fd00::1) unsupported"),
        ("0.0.0.0/80:224.0.0.1", "multicast target address 224.0.0.1"),
        ("0.0.0.0/80:10.0.0.1/80-81", "ranges differ in length"),
        ("0.0.0.0/80:nowhere.example/80", "bad target address 'nowhere.example'"),
        ("22:80:90", "more than one ':'"),
    ],
)
def test_target_addresses_refused(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(spec)


def test_rules_with_different_targets_do_not_merge_and_delete_exactly() -> None:
    tables = ForwardTables("passt", tcp_in=parse_spec("0.0.0.0/8080:10.89.0.5/80 0.0.0.0/8081:10.89.0.6/80"))
    assert len(tables.tcp_in.rules) == 2
    with pytest.raises(ConfigError, match="not forwarded as given"):
        tables.delete("tcp_in", "0.0.0.0/8080:10.89.0.6/80")
    left = tables.delete("tcp_in", "0.0.0.0/8080:10.89.0.5/80")
    assert left.tcp_in == parse_spec("0.0.0.0/8081:10.89.0.6/80")
    assert tables.add("tcp_in", "0.0.0.0/8082:10.89.0.5/80").tcp_in.to_spec().count("10.89.0.5") == 2


def test_changing_only_the_target_address_is_a_retarget() -> None:
    """Same socket key, other target: diff closes and opens the same key, which ListenerSet keeps open."""
    old, new = parse_spec("0.0.0.0/8080:10.89.0.5/80"), parse_spec("0.0.0.0/8080:10.89.0.6/80")
    to_close, to_open = diff(old, new)
    assert {lst.key for lst in to_close} == {lst.key for lst in to_open} == {(A0, None, 8080)}


def test_rule_validation_direct() -> None:
    assert ForwardRule(A0, None, 1, 1, 1, IPv4Address("0.0.0.0")).target_addr is None
    with pytest.raises(ConfigError, match="dual stack"):
        ForwardRule(None, None, 1, 1, 1, C5)
    assert PortPolicy("spec", (ForwardRule(A0, None, 5, 5, 6, C5),)).target(5, A0) == 6


def test_host_initiated_flow_goes_to_the_target_address() -> None:
    rig = Rig()
    conn = rig.handler.accepted(FakeSock(), FAR4, 40000, 80, 0.0, C5.packed)
    assert conn is not None and conn.guest_addr == C5.packed
    (syn,) = rig.take()
    assert syn.dst == C5.packed and syn.tcp.dport == 80
    # A target of the other family is ignored: the guest's own address, as without one.
    other = rig.handler.accepted(FakeSock(), FAR4, 40001, 80, 0.0, IPv6Address("fd00::5").packed)
    assert other is not None and other.guest_addr != IPv6Address("fd00::5").packed
