"""Port policy: passt's spec grammar (table), canonical round trips (hypothesis), diffs, ForwardTables."""

from __future__ import annotations

import time
import tracemalloc
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passtd.dataplane.core.fwd import (
    ALL,
    AUTO,
    NONE,
    ForwardRule,
    ForwardTables,
    Listener,
    PortPolicy,
    diff,
    parse_spec,
)
from passtd.errors import ConfigError

A4 = IPv4Address("192.0.2.1")
L4 = IPv4Address("127.0.0.1")
L6 = IPv6Address("::1")
EPH = (32768, 60999)


def parse_or_error(spec: str, **kw: Any) -> PortPolicy | ConfigError:
    try:
        return parse_spec(spec, **kw)
    except ConfigError as exc:
        return exc


def port_map(spec: str, **kw: Any) -> dict[tuple[object, object, int], int]:
    """Spec → {(addr, ifname, port): target} for every concrete listener."""
    return {(a, i, p): t for a, i, p, t in parse_spec(spec, **kw).ports(EPH)}


# --- valid specs: exact listeners -------------------------------------------------------------------------

VALID: list[tuple[str, dict[tuple[object, object, int], int]]] = [
    ("22", {(None, None, 22): 22}),
    ("22:23", {(None, None, 22): 23}),
    ("22,25", {(None, None, 22): 22, (None, None, 25): 25}),
    ("22-24", {(None, None, 22): 22, (None, None, 23): 23, (None, None, 24): 24}),
    ("22-24:8022-8024", {(None, None, 22): 8022, (None, None, 23): 8023, (None, None, 24): 8024}),
    ("192.0.2.1/22", {(A4, None, 22): 22}),
    ("192.0.2.1%eth0/22", {(A4, "eth0", 22): 22}),
    ("%lo/22", {(None, "lo", 22): 22}),
    ("::1/80", {(L6, None, 80): 80}),
    ("fe80::1%eth0/80", {(IPv6Address("fe80::1"), "eth0", 80): 80}),
    ("::ffff:127.0.0.1/80", {(L4, None, 80): 80}),  # v4-mapped is spelt as IPv4
    ("20-30,~25", {(None, None, p): p for p in (*range(20, 25), *range(26, 31))}),
    ("~25,20-30", {(None, None, p): p for p in (*range(20, 25), *range(26, 31))}),  # exclusions anywhere
    ("192.0.2.1/20-30,~25", {(A4, None, p): p for p in (*range(20, 25), *range(26, 31))}),
    ("20-22:120-122,~21", {(None, None, 20): 120, (None, None, 22): 122}),
    ("65535", {(None, None, 65535): 65535}),
    ("1:65535", {(None, None, 1): 65535}),
    ("022", {(None, None, 22): 22}),  # strtoul-style leading zeros
    ("127.0.0.1/80 ::1/80", {(L4, None, 80): 80, (L6, None, 80): 80}),  # repeated options, distinct scopes
    ("%eth0/80 %eth1/80", {(None, "eth0", 80): 80, (None, "eth1", 80): 80}),
    ("40000", {(None, None, 40000): 40000}),  # explicit ports inside the ephemeral range are honoured
    ("none", {}),
]


@pytest.mark.parametrize(("spec", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_spec_listeners(spec: str, expected: dict[tuple[object, object, int], int]) -> None:
    assert port_map(spec) == expected


def test_all_expands_minus_ephemeral_and_exclusions() -> None:
    ports = {p for _, _, p, _ in parse_spec("all").ports(EPH)}
    assert ports == set(range(1, 32768)) | set(range(61000, 65536))
    assert len(ALL.ports(None)) == 65535
    excl = parse_spec("~20000-20010,~22")
    assert excl.mode == "all" and excl.excluded == frozenset({22, *range(20000, 20011)})
    got = {p for _, _, p, t in excl.ports(EPH) if p == t}
    assert got == set(range(1, 32768)) - excl.excluded | set(range(61000, 65536))
    scoped = parse_spec("127.0.0.1%lo/~22")
    assert {(a, i) for a, i, _, _ in scoped.ports(EPH)} == {(L4, "lo")}
    assert scoped.target(22) is None and scoped.target(23) == 23 and scoped.target(23, L4) == 23
    assert scoped.target(23, A4) is None and scoped.target(23, L6) is None


def test_keywords_and_modes() -> None:
    assert parse_spec("none") == NONE
    assert parse_spec("auto", allow_auto=True) == AUTO and AUTO.ports() == []
    assert parse_spec("all") == ALL


def test_canonical_form_merges_and_sorts() -> None:
    p = parse_spec("25,22,23,24:24,90-91:190-191,92:192")
    assert p.rules == (ForwardRule(None, None, 22, 25, 22), ForwardRule(None, None, 90, 92, 190))
    assert p.to_spec() == "22-25,90-92:190-192"
    assert parse_spec("2000-5000,~3000-3010").to_spec() == "2000-2999,3011-5000"
    assert parse_spec("~5,~1-3").to_spec() == "~1-3,~5"
    assert parse_spec("::1/80 127.0.0.1/80 80-81".replace("80-81", "%lo/90")).to_spec() == (
        "%lo/90 127.0.0.1/80 ::1/80"
    )


# --- invalid specs: exact one-line messages ---------------------------------------------------------------

INVALID: list[tuple[str, str, dict[str, object]]] = [
    ("90-80", "-t: bad port range '90-80' (start after end)", {}),
    ("0", "-t: bad port range '0' (port 0 is not valid)", {}),
    ("0-10", "-t: bad port range '0-10' (port 0 is not valid)", {}),
    ("65536", "-t: bad port range '65536' (port above 65535)", {}),
    ("99999999999999999999", "-t: bad port range '99999999999999999999' (port above 65535)", {}),
    ("ssh", "-t: bad port range 'ssh' (not a number)", {}),
    ("22-", "-t: bad port range '22-' (not a number)", {}),
    ("-22", "-t: bad port range '-22' (not a number)", {}),
    ("\uff12\uff12", "-t: bad port range '\uff12\uff12' (not a number)", {}),  # fullwidth digits
    ("~", "-t: missing port in '~'", {}),
    ("22:", "-t: missing port in '22:'", {}),
    ("", "-t: empty port specifier", {}),
    ("   ", "-t: empty port specifier", {}),
    ("22,,80", "-t: empty item in '22,,80'", {}),
    ("22,", "-t: empty item in '22,'", {}),
    ("22-80:8022", "-t: bad port mapping '22-80:8022' (ranges differ in length)", {}),
    ("22:80:90", "-t: bad port mapping '22:80:90' (more than one ':')", {}),
    ("1-2:65535-65536", "-t: bad port range '65535-65536' (port above 65535)", {}),
    ("~22:80", "-t: bad exclusion '~22:80' (exclusions take no target)", {}),
    ("~20-30,~25", "-t: overlapping exclusion '~25' (port 25 already excluded)", {}),
    ("22-30,25", "-t: overlapping port specifier '25' (port 25 already forwarded)", {}),
    ("22 20-25", "-t: overlapping port specifier '20-25' (port 22 already forwarded)", {}),
    ("127.0.0.1/80 80", "-t: overlapping port specifier '80' (port 80 already forwarded)", {}),
    ("0.0.0.0/80 127.0.0.1/80", "-t: overlapping port specifier '80' (port 80 already forwarded)", {}),
    ("%lo/80 127.0.0.1/80", "-t: overlapping port specifier '80' (port 80 already forwarded)", {}),
    ("20,~20", "-t: '20,~20' excludes every port it forwards", {}),
    ("300.1.1.1/22", "-t: bad address '300.1.1.1' in '300.1.1.1/22'", {}),
    ("[::1]/22", "-t: bad address '[::1]' in '[::1]/22' (write IPv6 addresses without brackets)", {}),
    ("/22", "-t: missing address or interface before '/' in '/22'", {}),
    ("%/22", "-t: bad interface name '' in '%/22' (empty)", {}),
    (
        "%abcdefghijklmnop/22",
        "-t: bad interface name 'abcdefghijklmnop' in '%abcdefghijklmnop/22' (at most 15 characters)",
        {},
    ),
    ("%a:b/22", "-t: bad interface name 'a:b' in '%a:b/22' (contains one of '/%:,' or a blank)", {}),
    ("22 none", "-t: 'none' conflicts with '22'", {}),
    ("all 22", "-t: '22' conflicts with 'all'", {}),
    ("~22 80", "-t: '80' conflicts with '~22'", {}),
    ("none none", "-t: 'none' conflicts with 'none'", {}),
    ("auto", "-t: 'auto' port forwarding is only allowed for pasta", {}),
    ("all", "-t: 'all' port forwarding is only allowed for passt", {"allow_all": False}),
    (
        "127.0.0.1/22",
        "-T: address or interface '127.0.0.1/' not allowed here (only for -t and -u)",
        {"option": "-T"},
    ),
    ("90-80", "-u: bad port range '90-80' (start after end)", {"option": "-u"}),
]


@pytest.mark.parametrize(
    ("spec", "message", "kw"), INVALID, ids=[f"{i}:{v[0]}" for i, v in enumerate(INVALID)]
)
def test_invalid_spec_message(spec: str, message: str, kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(spec, **kw)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_exclusion_overlap_ignores_excluded_ports() -> None:
    """As passt: a port excluded by `~` may be named again by another range of the spec (it stays out)."""
    p = parse_spec("20-30,~25,25")
    assert {pt for _, _, pt, _ in p.ports()} == {*range(20, 25), *range(26, 31)}
    assert port_map("20-24,~25,25-26") == {(None, None, p): p for p in (20, 21, 22, 23, 24, 26)}


def test_many_fragments_parse_fast() -> None:
    spec = "1-65535," + ",".join(f"~{p}" for p in range(2, 65535, 2))
    start = time.perf_counter()
    p = parse_spec(spec)
    assert time.perf_counter() - start < 5
    assert len(p.rules) == 32768 and p.target(3) == 3 and p.target(4) is None


# --- target lookup ----------------------------------------------------------------------------------------


def test_target_lookup() -> None:
    p = parse_spec("127.0.0.1/80:8080 ::1/80:9090 22-24:122-124")
    assert p.target(80, L4) == 8080
    assert p.target(80, L6) == 9090
    assert p.target(80) == 8080  # unknown address: the first rule in canonical order
    assert p.target(23) == 123 and p.target(23, A4) == 123  # wildcard rule answers for any address
    assert p.target(81) is None and p.target(80, A4) is None
    assert NONE.target(22) is None and AUTO.target(22) is None
    assert ALL.target(22) == 22 and ALL.target(0) is None


# --- round trips ------------------------------------------------------------------------------------------

ADDRS = [None, L4, L6, A4, IPv4Address("0.0.0.0"), IPv6Address("fe80::1")]
IFNAMES = [None, "lo", "eth0"]


@st.composite
def policies(draw: st.DrawFn) -> PortPolicy:
    mode = draw(st.sampled_from(["none", "all", "spec", "excl", "auto"]))
    if mode in ("none", "auto", "all"):
        return PortPolicy(mode)  # type: ignore[arg-type]
    if mode == "excl":
        excluded = draw(st.frozensets(st.integers(1, 65535), min_size=1, max_size=40))
        return PortPolicy(
            "all",
            excluded=excluded,
            bind_addr=draw(st.sampled_from(ADDRS)),
            ifname=draw(st.sampled_from(IFNAMES)),
        )
    rules: list[ForwardRule] = []
    for _ in range(draw(st.integers(1, 12))):
        first = draw(st.integers(1, 65535))
        last = draw(st.integers(first, min(65535, first + draw(st.sampled_from([0, 1, 5, 300])))))
        span = last - first
        target = draw(st.one_of(st.just(first), st.integers(1, 65535 - span)))
        rule = ForwardRule(draw(st.sampled_from(ADDRS)), draw(st.sampled_from(IFNAMES)), first, last, target)
        try:
            PortPolicy("spec", (*rules, rule))
        except ConfigError:
            continue  # overlapping: drop it
        rules.append(rule)
    if not rules:
        return NONE
    return PortPolicy("spec", tuple(rules))


@settings(max_examples=400, deadline=None)
@given(policies())
def test_policy_round_trips_through_spec(policy: PortPolicy) -> None:
    spec = policy.to_spec()
    again = parse_spec(spec, allow_auto=True, allow_all=True)
    assert again == policy, spec
    assert again.to_spec() == spec
    if policy.mode == "spec":
        assert again.ports(EPH) == policy.ports(EPH)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(), st.integers(1, 400), st.integers(0, 20), st.one_of(st.none(), st.integers(1, 600))
        ),
        min_size=1,
        max_size=8,
    )
)
def test_random_specs_parse_or_fail_cleanly(items: list[tuple[bool, int, int, int | None]]) -> None:
    """Random item lists either parse to something that round-trips, or raise one ConfigError line."""
    parts = []
    for exclude, first, span, target in items:
        text = f"{first}-{first + span}" if span else str(first)
        if exclude:
            text = "~" + text
        elif target is not None:
            text += f":{target}-{target + span}" if span else f":{target}"
        parts.append(text)
    spec = ",".join(parts)
    policy = parse_or_error(spec)
    if isinstance(policy, ConfigError):
        assert str(policy).startswith("-t: ") and "\n" not in str(policy)
        return
    assert parse_spec(policy.to_spec()) == policy
    # Every forwarded port is one the spec named and did not exclude, at the offset it asked for.
    excluded = {p for ex, f, s, _ in items if ex for p in range(f, f + s + 1)}
    named = {p for ex, f, s, _ in items if not ex for p in range(f, f + s + 1)}
    for _, _, port, _target in policy.ports(None):
        assert port not in excluded
        assert port in named or policy.mode == "all"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789-~:,/%.abcdef[]l ", max_size=30))
def test_arbitrary_text_parses_or_raises_config_error(text: str) -> None:
    policy = parse_or_error(text, allow_auto=True)
    if isinstance(policy, ConfigError):
        assert str(policy).startswith("-t: ") and "\n" not in str(policy)
        return
    assert parse_spec(policy.to_spec(), allow_auto=True) == policy


def test_invalid_policies_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"overlapping rules '80' and '127\.0\.0\.1/80-81' \(port 80\)"):
        PortPolicy("spec", (ForwardRule(None, None, 80, 80, 80), ForwardRule(L4, None, 80, 81, 80)))
    with pytest.raises(ConfigError, match="needs at least one exclusion"):
        PortPolicy("all", bind_addr=L4)
    with pytest.raises(ConfigError, match="takes no rules"):
        PortPolicy("none", (ForwardRule(None, None, 1, 1, 1),))
    with pytest.raises(ConfigError, match="runs past 65535"):
        ForwardRule(None, None, 10, 20, 65530)
    with pytest.raises(ConfigError, match="not within 1-65535"):
        ForwardRule(None, None, 0, 20, 1)


# --- diff -------------------------------------------------------------------------------------------------


def test_diff_opens_and_closes_exactly_the_changes() -> None:
    old = parse_spec("22,80-81 127.0.0.1/8000")
    new = parse_spec("22,81:8081,443 127.0.0.1/8000")
    to_close, to_open = diff(old, new, EPH)
    assert to_close == {Listener(None, None, 80, 80), Listener(None, None, 81, 81)}
    assert to_open == {Listener(None, None, 81, 8081), Listener(None, None, 443, 443)}
    # The retargeted port keeps its socket key: ListenerSet retargets it in place.
    assert {lst.key for lst in to_close} & {lst.key for lst in to_open} == {(None, None, 81)}
    assert diff(new, new, EPH) == (set(), set())


def test_diff_between_modes() -> None:
    to_close, to_open = diff(NONE, parse_spec("~1-1000"), EPH)
    assert not to_close and len(to_open) == 32767 - 1000 + (65535 - 60999)
    to_close, to_open = diff(parse_spec("~1-1000"), parse_spec("~1-1001"), EPH)
    assert to_close == {Listener(None, None, 1001, 1001)} and not to_open
    to_close, to_open = diff(parse_spec("22"), AUTO, EPH)
    assert to_close == {Listener(None, None, 22, 22)} and not to_open  # auto's ports come from the scanner
    to_close, to_open = diff(ALL, ALL, None)
    assert to_close == to_open == set()


def test_all_expansion_time_and_memory() -> None:
    """~65k Listener objects for "all" with no ephemeral range: measured, and bounded generously."""
    tracemalloc.start()
    try:
        start = time.perf_counter()
        listeners = parse_spec("all").listeners(None)
        elapsed = time.perf_counter() - start
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(listeners) == 65535
    print(f"all → {len(listeners)} listeners: {elapsed * 1000:.1f} ms, {current / 2**20:.1f} MiB")
    assert elapsed < 5
    assert current < 64 * 2**20


# --- ForwardTables ----------------------------------------------------------------------------------------


def test_from_options_defaults() -> None:
    passt = ForwardTables.from_options(None, None, None, None, "passt")
    assert (passt.tcp_in, passt.udp_in, passt.tcp_out, passt.udp_out) == (NONE, NONE, NONE, NONE)
    pasta = ForwardTables.from_options(None, None, None, None, "pasta")
    assert (pasta.tcp_in, pasta.udp_in, pasta.tcp_out, pasta.udp_out) == (AUTO, AUTO, AUTO, AUTO)


def test_udp_follows_tcp_without_translation() -> None:
    t = ForwardTables.from_options(
        "2222:22,127.0.0.1/80".replace(",127.0.0.1/80", " 127.0.0.1/80"), None, None, None, "passt"
    )
    assert t.tcp_in.target(2222) == 22
    assert t.udp_in.to_spec() == "2222 127.0.0.1/80"
    assert t.udp_in.target(2222) == 2222
    explicit = ForwardTables.from_options("22", "53", None, None, "passt")
    assert explicit.udp_in.to_spec() == "53"
    pasta = ForwardTables.from_options(None, None, "5432", None, "pasta")
    assert pasta.tcp_in == AUTO and pasta.udp_in == AUTO  # -u not following an absent -t: the default
    assert pasta.tcp_out.to_spec() == "5432" and pasta.udp_out.to_spec() == "5432"
    excl = ForwardTables.from_options("~22", None, None, None, "passt")
    assert excl.udp_in == excl.tcp_in


def test_from_options_mode_rules() -> None:
    with pytest.raises(ConfigError, match=r"^-T: only valid in pasta mode$"):
        ForwardTables.from_options(None, None, "22", None, "passt")
    with pytest.raises(ConfigError, match=r"^-t: 'auto' port forwarding is only allowed for pasta$"):
        ForwardTables.from_options("auto", None, None, None, "passt")
    with pytest.raises(ConfigError, match=r"^-u: 'all' port forwarding is only allowed for passt$"):
        ForwardTables.from_options(None, "all", None, None, "pasta")
    assert ForwardTables.from_options("all", None, None, None, "passt").udp_in == ALL
    assert ForwardTables.from_options("~22", None, None, None, "pasta").tcp_in.excluded == {22}
    with pytest.raises(ConfigError, match=r"^-U: address or interface"):
        ForwardTables.from_options(None, None, None, "::1/53", "pasta")


def test_tables_add_delete_clear_replace() -> None:
    t0 = ForwardTables.from_options("22", None, None, None, "passt")
    t1 = t0.add("tcp_in", "80-90")
    assert t1.tcp_in.to_spec() == "22,80-90" and t0.tcp_in.to_spec() == "22"  # immutable
    assert t1.udp_in == t0.udp_in
    t2 = t1.add("tcp_in", "127.0.0.1/8080 ::1/8080:80")
    assert t2.tcp_in.to_spec() == "22,80-90 127.0.0.1/8080 ::1/8080:80"
    with pytest.raises(
        ConfigError, match=r"^-t: overlapping port specifier '85' \(port 85 already forwarded\)$"
    ):
        t2.add("tcp_in", "85")
    t3 = t2.delete("tcp_in", "84-86")
    assert t3.tcp_in.to_spec() == "22,80-83,87-90 127.0.0.1/8080 ::1/8080:80"
    with pytest.raises(ConfigError, match=r"^-t: cannot delete '84' \(not forwarded as given\)$"):
        t3.delete("tcp_in", "84")
    with pytest.raises(ConfigError, match=r"^-t: cannot delete '::1/8080' \(not forwarded as given\)$"):
        t3.delete("tcp_in", "::1/8080")  # forwarded, but to 80: a delete must say what it deletes
    t4 = t3.delete("tcp_in", "::1/8080:80").delete("tcp_in", "127.0.0.1/8080")
    assert t4.tcp_in.to_spec() == "22,80-83,87-90"
    assert t4.delete("tcp_in", "22,80-83,87-90").tcp_in == NONE
    assert t4.clear("tcp_in").tcp_in == NONE
    assert t4.replace("tcp_in", "443").tcp_in.to_spec() == "443"
    assert t4.add("tcp_in", "none") == t4
    assert (
        t4.clear("tcp_in").tcp_in == NONE and t4.clear("tcp_in").add("tcp_in", "22").tcp_in.to_spec() == "22"
    )


def test_tables_modes_in_operations() -> None:
    passt = ForwardTables.from_options("all", None, None, None, "passt")
    with pytest.raises(ConfigError, match=r"^-t: cannot add '22' to 'all'$"):
        passt.add("tcp_in", "22")
    excl = passt.delete("tcp_in", "22,80-81")
    assert excl.tcp_in.excluded == {22, 80, 81} and excl.tcp_in.to_spec() == "~22,~80-81"
    with pytest.raises(ConfigError, match=r"^-t: cannot delete '22' \(not forwarded\)$"):
        excl.delete("tcp_in", "22")
    assert passt.delete("tcp_in", "all").tcp_in == NONE
    with pytest.raises(ConfigError, match=r"^-T: only valid in pasta mode$"):
        passt.add("tcp_out", "22")
    assert passt.clear("tcp_out") == passt
    pasta = ForwardTables.from_options(None, None, None, None, "pasta")
    assert pasta.replace("udp_out", "53").udp_out.to_spec() == "53"
    with pytest.raises(ConfigError, match=r"^-u: 'all' port forwarding is only allowed for passt$"):
        pasta.replace("udp_in", "all")
    assert pasta.delete("tcp_in", "auto").tcp_in == NONE
    assert pasta.to_specs() == {"tcp_in": "auto", "udp_in": "auto", "tcp_out": "auto", "udp_out": "auto"}
    with pytest.raises(ConfigError, match="bad forwarding direction"):
        pasta.policy("sctp_in")  # type: ignore[arg-type]


def test_tables_validate_on_construction() -> None:
    with pytest.raises(ConfigError, match=r"^-T: only valid in pasta mode$"):
        ForwardTables("passt", tcp_out=parse_spec("22"))
    with pytest.raises(ConfigError, match="only allowed for pasta"):
        ForwardTables("passt", tcp_in=AUTO)
    assert ip_address("::1") == ForwardTables("pasta", tcp_in=parse_spec("::1/22")).tcp_in.rules[0].bind_addr


@settings(max_examples=10, deadline=None)  # each example builds ~2 x 60k listeners the slow way
@given(
    st.frozensets(st.integers(1, 65535), min_size=1, max_size=30),
    st.frozensets(st.integers(1, 65535), min_size=1, max_size=30),
    st.sampled_from([None, EPH]),
)
def test_diff_fast_path_for_exclusions_matches_set_difference(
    old_ex: frozenset[int], new_ex: frozenset[int], eph: tuple[int, int] | None
) -> None:
    old, new = PortPolicy("all", excluded=old_ex), PortPolicy("all", excluded=new_ex)
    before, after = old.listeners(eph), new.listeners(eph)
    assert diff(old, new, eph) == (before - after, after - before)
