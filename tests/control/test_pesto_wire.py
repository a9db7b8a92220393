"""pesto protocol v2 bytes, checked against the layout of upstream's C structs, and the table mapping.

The expected bytes are written out by hand from pesto.h / fwd_rule.h / serialise.c (big-endian u32/u16,
inany addresses as IPv4-mapped IPv6), not produced by the code under test.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from passtd.control import pesto_wire as wire
from passtd.dataplane.core.fwd import ForwardTables, PortPolicy, parse_spec

EPH = (32768, 60999)
V4MAPPED = b"\0" * 10 + b"\xff\xff"


def test_hello_bytes() -> None:
    assert wire.pack_hello() == (
        b"basil:s\0" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x80" + b"\x00\x00\x00\x10"
    )


def test_rule_bytes_with_target_address() -> None:
    rule = wire.Rule(IPv4Address("0.0.0.0"), IPv4Address("10.89.0.5"), "", 8080, 8080, 80, 6)
    raw = wire.pack_rule(rule)
    assert raw == (
        V4MAPPED + bytes(4)  # addr 0.0.0.0
        + V4MAPPED + bytes([10, 89, 0, 5])  # taddr
        + bytes(16)  # ifname ""
        + b"\x1f\x90" + b"\x1f\x90" + b"\x00\x50"  # first 8080, last 8080, to 80
        + b"\x06" + b"\x00"  # TCP, no flags
    )  # fmt: skip
    assert len(raw) == 56
    assert wire.unpack_rule(raw) == rule


def test_dual_stack_rule_bytes() -> None:
    rule = wire.Rule(None, None, "lo", 22, 25, 2022, 17, wire.WEAK)
    raw = wire.pack_rule(rule)
    assert raw == (
        bytes(16) + bytes(16) + b"lo" + bytes(14)
        + b"\x00\x16\x00\x19\x07\xe6" + b"\x11" + bytes([wire.DUAL_STACK_ANY | wire.WEAK])
    )  # fmt: skip
    assert wire.unpack_rule(raw) == rule


def test_server_message_for_one_table() -> None:
    tables = ForwardTables("passt", tcp_in=parse_spec("0.0.0.0/8080:10.89.0.5/80"))
    pifs = wire.server_tables(tables, True, False, EPH)
    assert [(p.pif, p.name) for p in pifs] == [(1, "HOST")]
    raw = wire.pack_server_tables(pifs)
    caps = wire.CAP_IPV4 | wire.CAP_TCP | wire.CAP_UDP | wire.CAP_IFNAME
    assert raw[0] == 1
    assert raw[1:137] == b"HOST" + bytes(124) + caps.to_bytes(4, "big") + (1).to_bytes(4, "big")
    assert raw[137:193] == wire.pack_rule(
        wire.Rule(IPv4Address("0.0.0.0"), IPv4Address("10.89.0.5"), "", 8080, 8080, 80, 6)
    )
    assert raw[193:] == b"\x00"


def test_client_message() -> None:
    table = wire.PifTable(1, "HOST", 0, [wire.Rule(None, None, "", 22, 22, 22, 6)])
    raw = wire.pack_client_tables([table])
    assert raw[:5] == b"\x01\x00\x00\x00\x01" and len(raw) == 5 + 56 + 1 and raw[-1] == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"basil:x\0" + bytes(12), "Bad magic number from server"),
        (b"basil:s\0\x00\x00\x00\x01" + bytes(8), "Unsupported server protocol version 1"),
        (b"basil:s\0\x00\x00\x00\x03" + bytes(8), "Unknown server protocol version 3 > 2"),
        (b"basil:s\0\x00\x00\x00\x02\x00\x00\x00\x40\x00\x00\x00\x10", "unexpected pif name size"),
    ],
)
def test_hello_refused(raw: bytes, message: str) -> None:
    with pytest.raises(wire.PestoError, match=message):
        wire.check_hello(raw)


def _rule_bytes(**over: object) -> bytes:
    fields: dict[str, object] = {
        "addr": V4MAPPED + bytes(4), "taddr": bytes(16), "ifname": bytes(16),
        "first": 80, "last": 80, "to": 80, "proto": 6, "flags": 0,
    }  # fmt: skip
    fields.update(over)
    return wire.RULE.pack(*fields.values())


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"ifname": b"x" * 16}, "not NUL terminated"),
        ({"flags": 0x80}, "invalid flags 0x80"),
        ({"proto": 1}, "unsupported protocol 1"),
        ({"first": 0, "last": 0}, "invalid port range 0-0"),
        ({"first": 90, "last": 80}, "invalid port range 90-80"),
        ({"to": 0}, "map to port 0"),
        ({"first": 1, "last": 10, "to": 65530}, "map to port 0"),
        ({"flags": wire.DUAL_STACK_ANY}, "non-wildcard address 0.0.0.0"),
        ({"ifname": b"\xff" + bytes(15)}, "not ASCII"),
    ],
)
def test_bad_rules_refused(over: dict[str, object], message: str) -> None:
    with pytest.raises(wire.PestoError, match=message):
        wire.unpack_rule(_rule_bytes(**over))


def _round_trip(tables: ForwardTables, ipv4: bool = True, ipv6: bool = True) -> ForwardTables:
    pifs = wire.server_tables(tables, ipv4, ipv6, EPH)
    new, _ = wire.tables_from_pifs(tables, {p.pif: p.rules for p in pifs}, EPH)
    return new


@pytest.mark.parametrize(
    ("mode", "t", "u", "T", "U"),
    [
        ("passt", "22,80:8080", "53", None, None),
        ("passt", "all", "~53,~5353", None, None),
        ("passt", "127.0.0.1/~22", "none", None, None),
        ("passt", "0.0.0.0/8080:10.89.0.5/80 ::/8080:[fd00::5]/8081", "none", None, None),
        ("pasta", "auto", "auto", "auto", "auto"),
        ("pasta", "22", "none", "5432,6000-6010", "53"),
        ("pasta", "%eth0/443 127.0.0.1/80", "none", "none", "none"),
    ],
)
def test_tables_survive_the_trip_through_pesto_rules(
    mode: str, t: str, u: str, T: str | None, U: str | None
) -> None:
    tables = ForwardTables.from_options(t, u, T, U, mode)  # type: ignore[arg-type]
    assert _round_trip(tables) == tables


def test_splice_rules_from_loopback_addresses_become_one_unscoped_rule() -> None:
    """Upstream's client without SO_BINDTODEVICE writes -T as one rule per loopback address."""
    base = ForwardTables("pasta")
    rules = [
        wire.Rule(IPv4Address("127.0.0.1"), None, "", 5432, 5432, 5432, 6),
        wire.Rule(IPv6Address("::1"), None, "", 5432, 5432, 5432, 6),
    ]
    new, _ = wire.tables_from_pifs(base, {wire.PIF_SPLICE: rules}, EPH)
    assert new.tcp_out == parse_spec("5432", option="-T")
    one_family = [wire.Rule(IPv4Address("0.0.0.0"), None, "lo", 5432, 5432, 5432, 6)]  # an IPv4-only server
    assert wire.tables_from_pifs(base, {wire.PIF_SPLICE: one_family}, EPH)[0] == new


@pytest.mark.parametrize(
    ("mode", "pif", "rules", "message"),
    [
        ("passt", 3, [], "non-existent table 3"),
        ("passt", 1, [wire.Rule(None, IPv4Address("10.0.0.1"), "", 80, 80, 80, 6)], "dual stack forward"),
        ("passt", 1, [wire.Rule(None, None, "", 80, 81, 80, 6), wire.Rule(None, None, "", 81, 81, 90, 6)],
         "overlapping"),
        ("pasta", 1, [wire.Rule(None, None, "", 80, 80, 80, 6, wire.SCAN | wire.WEAK)], "every port or none"),
        ("pasta", 3, [wire.Rule(IPv4Address("10.0.0.1"), None, "", 80, 80, 80, 6)], "loopback only"),
        ("pasta", 1, [wire.Rule(None, None, "", 1, 65535, 1, 6, wire.WEAK)], "only allowed for passt"),
    ],
)  # fmt: skip
def test_tables_passtd_refuses(mode: str, pif: int, rules: list[wire.Rule], message: str) -> None:
    with pytest.raises(wire.PestoError, match=message):
        wire.tables_from_pifs(ForwardTables(mode), {pif: rules}, EPH)  # type: ignore[arg-type]


def test_presentation_keeps_the_rules_as_the_client_sent_them() -> None:
    """Adjacent rules merge in passtd's policy, but are listed back as sent, so `-D -t 8080` still matches."""
    base = ForwardTables("passt")
    sent = [wire.Rule(None, None, "", 8080, 8080, 8080, 6), wire.Rule(None, None, "", 8081, 8081, 8081, 6)]
    new, shown = wire.tables_from_pifs(base, {1: sent}, EPH)
    assert new.tcp_in.rules[0].first == 8080 and new.tcp_in.rules[0].last == 8081
    assert wire.server_tables(new, True, True, EPH, shown)[0].rules == sent
    assert wire.server_tables(new, True, True, EPH)[0].rules == [
        wire.Rule(None, None, "", 8080, 8081, 8080, 6)
    ]


def test_merge_of_two_clients_edits() -> None:
    base = ForwardTables("passt", tcp_in=parse_spec("22"))
    first = ForwardTables("passt", tcp_in=parse_spec("22,80"))  # committed first
    second = ForwardTables(
        "passt", tcp_in=parse_spec("443"), udp_in=parse_spec("53")
    )  # 22 deleted, 443 added
    merged = wire.merge(base, first, second)
    assert merged.tcp_in == parse_spec("80,443") and merged.udp_in == parse_spec("53")
    assert wire.merge(base, first, base) == first  # a client that changed nothing changes nothing
    assert wire.merge(base, base, second) == second


def test_rule_format_is_upstreams() -> None:
    assert wire.Rule(None, None, "", 22, 22, 22, 6).fmt() == "TCP [*]:22  =>  22 "
    assert (
        wire.Rule(IPv4Address("0.0.0.0"), IPv4Address("10.89.0.5"), "", 8080, 8081, 80, 6).fmt()
        == "TCP [0.0.0.0]:8080-8081  =>  10.89.0.5:80-81 "
    )
    assert (
        wire.Rule(None, None, "lo", 1, 100, 1, 17, wire.WEAK | wire.SCAN).fmt()
        == "UDP [*]%lo:1-100  =>  1-100  (best effort) (auto-scan)"
    )


def test_all_policy_as_weak_rules_skips_the_ephemeral_range() -> None:
    rules = wire.policy_rules("tcp_in", PortPolicy("all", excluded=frozenset({22})), EPH)
    assert [(r.first, r.last) for r in rules] == [(1, 21), (23, 32767), (61000, 65535)]
    assert all(r.flags == wire.WEAK and r.addr is None for r in rules)


# -- the pesto command's editing (upstream's fwd_rule_parse, the NOTES of pesto(1)) ---------------------

ALL_CAPS = wire.CAP_IPV4 | wire.CAP_IPV6 | wire.CAP_TCP | wire.CAP_UDP | wire.CAP_SCAN | wire.CAP_IFNAME


def test_spec_rules_follow_the_servers_capabilities() -> None:
    from passtd.pesto_cli import spec_rules

    assert spec_rules("t", "22,25", ALL_CAPS, EPH) == [
        wire.Rule(None, None, "", 22, 22, 22, 6),
        wire.Rule(None, None, "", 25, 25, 25, 6),
    ]  # one rule per included range, as upstream
    v4_only = ALL_CAPS & ~wire.CAP_IPV6
    assert spec_rules("u", "53", v4_only, EPH) == [
        wire.Rule(IPv4Address("0.0.0.0"), None, "", 53, 53, 53, 17)
    ]
    assert spec_rules("T", "5432", ALL_CAPS, EPH) == [wire.Rule(None, None, "lo", 5432, 5432, 5432, 6)]
    no_ifname = ALL_CAPS & ~wire.CAP_IFNAME
    assert spec_rules("T", "5432", no_ifname, EPH) == [
        wire.Rule(IPv4Address("127.0.0.1"), None, "", 5432, 5432, 5432, 6),
        wire.Rule(IPv6Address("::1"), None, "", 5432, 5432, 5432, 6),
    ]
    assert spec_rules("t", "0.0.0.0/8080:10.89.0.5/80", ALL_CAPS, EPH) == [
        wire.Rule(IPv4Address("0.0.0.0"), IPv4Address("10.89.0.5"), "", 8080, 8080, 80, 6)
    ]
    assert spec_rules("t", "::1/80,81", ALL_CAPS, EPH) == [
        wire.Rule(IPv6Address("::1"), None, "", 80, 80, 80, 6),
        wire.Rule(IPv6Address("::1"), None, "", 81, 81, 81, 6),
    ]


def test_edit_runs_the_options_in_order() -> None:
    """pesto(1): `-A -t 2000 -C HOST -A -T 3000 -t 2001 -D -u 5000` adds 2000, clears HOST, adds -T 3000 and
    2001, deletes UDP 5000."""
    from passtd.pesto_cli import Die, edit

    host = wire.PifTable(1, "HOST", ALL_CAPS, [wire.Rule(None, None, "", 5000, 5000, 5000, 17)])
    splice = wire.PifTable(3, "SPLICE", ALL_CAPS)
    opts = [("-A", ""), ("-t", "2000"), ("-C", "HOST"), ("-A", ""), ("-T", "3000"), ("-t", "2001")]
    edit([host, splice], opts)
    assert host.rules == [wire.Rule(None, None, "", 2001, 2001, 2001, 6)]
    assert splice.rules == [wire.Rule(None, None, "lo", 3000, 3000, 3000, 6)]
    with pytest.raises(Die, match="Unable to delete rule UDP"):
        edit([host, splice], [("-D", ""), ("-u", "5000")])  # cleared with HOST above
    with pytest.raises(Die, match="-t none conflicts with previous options"):
        edit([host, splice], [("-A", ""), ("-t", "none")])
    with pytest.raises(Die, match="Unsupported pif name TAP"):
        edit([host, splice], [("-C", "TAP")])
    with pytest.raises(Die, match="Can't use -T, no outbound interface"):
        edit([host], [("-T", "1")])


def test_one_family_server_lists_any_address_as_upstream_and_reads_it_back() -> None:
    """IPv4 only: upstream writes "any" as 0.0.0.0. passtd's unscoped rules are listed so (upstream's client
    can then delete them by the spec it would use), and read back unscoped; a 0.0.0.0 the client wrote
    itself stays explicit."""
    tables = ForwardTables("passt", tcp_in=parse_spec("22 0.0.0.0/80"), udp_in=parse_spec("~53"))
    implicit: set[wire.Rule] = set()
    (host,) = wire.server_tables(tables, True, False, EPH, implicit=implicit)
    any4 = IPv4Address("0.0.0.0")
    assert wire.Rule(any4, None, "", 22, 22, 22, 6) in host.rules and all(r.addr == any4 for r in host.rules)
    assert wire.Rule(any4, None, "", 80, 80, 80, 6) not in implicit
    new, _ = wire.tables_from_pifs(tables, {1: host.rules}, EPH, implicit)
    assert new == tables
    added = [*host.rules, wire.Rule(any4, None, "", 443, 443, 443, 6)]
    new, _ = wire.tables_from_pifs(tables, {1: added}, EPH, implicit)
    assert new.tcp_in == parse_spec("22 0.0.0.0/80,443")
