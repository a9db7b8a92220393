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


# The keyed hash state per secret (one per process in practice): copying it skips the key's own compression
# and the keyword parsing of a new keyed object, once per connection.
_KEYED: dict[bytes, hashlib.blake2s] = {}


def isn(secret: bytes, src: bytes, sport: int, dst: bytes, dport: int, now: float) -> int:
    """RFC 6528 §3: ISN = M + F(4-tuple, secret), M a 4 µs clock, F a keyed hash (BLAKE2s here)."""
    base = _KEYED.get(secret)
    if base is None:
        if len(_KEYED) >= 4:
            _KEYED.clear()
        base = _KEYED[secret] = hashlib.blake2s(key=secret, digest_size=4)
    h = base.copy()
    h.update(src + dst + ((sport << 16) | dport).to_bytes(4, "big"))
    return (int(now * 250_000) + int.from_bytes(h.digest(), "big")) & MASK
