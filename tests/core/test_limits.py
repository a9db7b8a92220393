"""The pure split of the listener room between the listener sets of one policy change (core/limits.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.core.limits import fair_shares


def test_fair_shares_examples() -> None:
    assert fair_shares(100, [30, 30]) == [30, 30]  # enough for all: each gets its want
    assert fair_shares(100, [131070, 131070]) == [50, 50]  # -t all -u all: halves
    assert fair_shares(100, [10, 131070, 131070]) == [10, 45, 45]  # a small want is served whole
    assert fair_shares(101, [500, 500]) == [50, 51]  # the remainder goes to the last served
    assert fair_shares(0, [5, 5]) == [0, 0]
    assert fair_shares(-3, [5]) == [0]  # a pool already over its room gives nothing
    assert fair_shares(10, []) == []


@given(st.integers(0, 10_000), st.lists(st.integers(0, 5_000), max_size=6))
def test_fair_shares_are_max_min_fair(budget: int, wants: list[int]) -> None:
    shares = fair_shares(budget, wants)
    assert len(shares) == len(wants)
    assert all(0 <= s <= w for s, w in zip(shares, wants, strict=True))
    assert sum(shares) <= budget
    if sum(wants) <= budget:
        assert shares == wants
    else:
        assert sum(shares) == budget  # nothing is left unused while someone wants more
        short = [s for s, w in zip(shares, wants, strict=True) if s < w]
        # Nobody who got less than it asked for got less than anyone else (up to the division's remainder).
        assert min(short) >= max(shares) - 1
