"""Token bucket arithmetic with an injected clock (core/ratelimit.py); the live limits are in
tests/netns/test_ratelimit.py."""

from __future__ import annotations

import pytest

from passtd.dataplane.core.ratelimit import (
    BURST_FLOOR,
    QUANTUM_MAX,
    WAIT_MIN,
    RateSpec,
    Shaper,
    TokenBucket,
    default_burst,
    egress_window,
)


def bucket(rate: int, burst: int, now: float = 0.0) -> TokenBucket:
    return TokenBucket(RateSpec(rate, burst), now)


def test_starts_full_and_refills_at_rate() -> None:
    b = bucket(8000, 4000)  # 1000 bytes/s
    assert b.available(0.0) == 4000
    assert b.take(4000, 0.0)
    assert b.available(0.0) == 0
    assert b.available(0.5) == 500
    assert b.available(1.25) == 1250


def test_burst_caps_the_balance_after_long_idle() -> None:
    b = bucket(8000, 4000)
    b.charge(4000, 0.0)
    assert b.available(3600.0 * 24 * 365) == 4000
    assert not b.take(4001, 1e9)


def test_take_is_whole_or_nothing() -> None:
    b = bucket(8000, 1500)
    assert b.take(1000, 0.0)
    assert not b.take(1000, 0.0)  # 500 left: the datagram does not pass, nothing is spent
    assert b.available(0.0) == 500
    assert b.take(1000, 0.5)  # 500 + 500


def test_charge_leaves_a_debt_paid_back_first() -> None:
    b = bucket(8000, 2000)
    b.charge(5000, 0.0)  # 3000 in debt
    assert b.available(0.0) == 0
    assert b.available(2.0) == 0  # 1000 still owed
    assert b.wait(1000, 2.0) == 2.0
    assert b.available(4.0) == 1000


def test_wait_is_exact_and_capped_at_burst() -> None:
    b = bucket(8000, 2000)
    b.charge(2000, 10.0)
    assert b.wait(500, 10.0) == 0.5
    assert b.wait(10**9, 10.0) == 2.0  # more than the burst never fits: wait for a full bucket
    assert b.wait(0, 10.0) == 0.0


def test_time_going_backwards_changes_nothing() -> None:
    b = bucket(8000, 2000, now=5.0)
    b.charge(2000, 5.0)
    assert b.available(4.0) == 0
    assert b.available(6.0) == 1000


@pytest.mark.parametrize("rate", [1_000, 1_000_000, 100_000_000, 1_000_000_000, 100_000_000_000])
def test_tiny_to_huge_rates(rate: int) -> None:
    spec = RateSpec.of(rate)
    b = TokenBucket(spec, 0.0)
    b.charge(spec.burst, 0.0)
    # after one second exactly rate/8 bytes came back (or the burst, if smaller)
    assert b.available(1.0) == min(spec.burst, rate // 8)
    assert b.wait(b.quantum, 1.0) == 0.0 or b.available(1.0) < b.quantum
    assert 1 <= b.quantum <= QUANTUM_MAX


def test_default_burst() -> None:
    assert default_burst(1_000_000) == BURST_FLOOR
    assert default_burst(1_000_000_000) == 2_500_000  # 20 ms at 125 MB/s
    assert RateSpec.of(1_000_000, 3000) == RateSpec(1_000_000, 3000)


@pytest.mark.parametrize(("rate", "burst"), [(999, 0), (10**13, 0), (1_000_000, 100), (1_000_000, 1 << 31)])
def test_spec_range(rate: int, burst: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        RateSpec.of(rate, burst)


def test_shaper_counts_drops_and_keeps_an_unchanged_bucket() -> None:
    s = Shaper()
    assert (s.egress, s.ingress) == (None, None)
    s.configure(RateSpec(8000, 1500), None, 0.0)
    eg = s.egress
    assert eg is not None
    assert s.admit(eg, 1000, 0.0, "udp.egress")
    assert not s.admit(eg, 1000, 0.0, "udp.egress")
    assert s.counters["egress.bytes"] == 1000
    assert s.counters["udp.egress.dropped"] == 1
    assert s.counters["udp.egress.dropped_bytes"] == 1000
    s.configure(RateSpec(8000, 1500), RateSpec(16000, 2000), 1.0)
    assert s.egress is eg  # same spec: same balance, no fresh burst on a reload
    assert s.ingress is not None and s.ingress.available(1.0) == 2000
    s.configure(None, None, 2.0)
    assert not any((s.egress, s.ingress))


def test_reopen_is_never_shorter_than_the_loop_clock() -> None:
    """A wait of a fraction of a byte would vanish in `now + wait` (now ~ 3e4 s) and spin the timer."""
    b = bucket(2_000_000, 16384, now=32000.0)
    b.charge(16384, 32000.0)
    b.tokens = 4095.9999999
    assert 0 < b.wait(4096, 32000.0) < 1e-9
    assert b.reopen(4096, 32000.0) == WAIT_MIN
    assert 32000.0 + b.reopen(4096, 32000.0) > 32000.0


def test_egress_window_offers_at_least_a_segment_once_a_quantum_is_back() -> None:
    b = bucket(2_000_000, 16384)  # 250 000 bytes/s, quantum 4096
    # bucket smaller than the guest's MSS (MTU 65520): a full bucket opens one segment, the excess is a debt
    assert egress_window(b, 16384, 1 << 20, 65480, 0.0) == (65480, 0.0)
    b.charge(65480, 0.0)
    room, wait = egress_window(b, b.available(0.0), 1 << 20, 65480, 0.0)
    assert room == 0 and wait == pytest.approx((65480 - 16384 + 16384) / 250_000)
    # MSS 1460: a quantum is enough; the socket's own room still caps it
    b2 = bucket(2_000_000, 16384)
    assert egress_window(b2, 5000, 1 << 20, 1460, 0.0) == (5000, 0.0)
    assert egress_window(b2, 5000, 3000, 1460, 0.0) == (3000, 0.0)
    room, wait = egress_window(b2, 1000, 1 << 20, 1460, 0.0)
    assert room == 1000 and wait > 0
