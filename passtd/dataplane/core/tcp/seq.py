"""Sequence-number arithmetic modulo 2**32 (RFC 9293 §3.4) and initial sequence numbers (RFC 6528)."""

from __future__ import annotations

import hashlib
from typing import Final

MOD: Final = 1 << 32
MASK: Final = MOD - 1
HALF: Final = 1 << 31


def seq_add(a: int, n: int) -> int:
    return (a + n) & MASK


def seq_diff(a: int, b: int) -> int:
    """a - b as a signed distance in (-2**31, 2**31]."""
    d = (a - b) & MASK
    return d - MOD if d > HALF else d


def seq_lt(a: int, b: int) -> bool:
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    return seq_diff(a, b) <= 0


def isn(secret: bytes, src: bytes, sport: int, dst: bytes, dport: int, now: float) -> int:
    """RFC 6528 §3: ISN = M + F(4-tuple, secret), M a 4 µs clock, F a keyed hash (BLAKE2s here)."""
    h = hashlib.blake2s(
        src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"), key=secret, digest_size=4
    )
    return (int(now * 250_000) + int.from_bytes(h.digest(), "big")) & MASK
