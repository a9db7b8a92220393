"""Rate limits: token buckets for the guest's traffic as a whole, one per direction (issue 17).

A bucket holds up to `burst` bytes of tokens and gains `rate / 8` bytes per second. Time is passed in: the
bucket never reads a clock, so its arithmetic is exact under a test's literal floats.

How each protocol spends tokens (the callers, not this module, decide):

* TCP is shaped without loss. Guest → host: the window passtd advertises never reaches past the tokens left,
  the bytes written to the host socket are charged (the balance may go below zero when several flows share
  one window's worth), and the flow's ACK timer reopens the window once `quantum` bytes are back. Host →
  guest: passtd sends no more than the tokens allow and leaves the rest in the host socket (whose own window
  then slows the peer), resuming on the flow's timer.
* UDP datagrams and ICMP echo messages either fit (`take`) or are dropped and counted.

`Shaper` is what the dataplane shares: the two buckets (None: unlimited, tested once per flow and batch,
or once per datagram) and the counters the control plane reports.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

RATE_MIN: Final = 1_000  # bit/s; below this a single full-sized frame would take more than ten seconds
RATE_MAX: Final = 1_000_000_000_000  # 1 Tbit/s
BURST_MIN: Final = 1_500  # one Ethernet frame's payload: a smaller bucket could never pass a full datagram
BURST_MAX: Final = 1 << 30
BURST_TIME: Final = 0.02  # default burst: 20 ms at the rate...
BURST_FLOOR: Final = 16 * 1024  # ...but at least this (a TCP window smaller than this stalls a guest)
WAIT_MIN: Final = 0.001  # seconds: the event loop's clock resolution
QUANTUM_MAX: Final = 1 << 20  # a held TCP flow resumes once this much (or a quarter of the burst) is back


def default_burst(rate: int) -> int:
    """The burst when none is given: 20 ms at the rate, at least 16 KiB (short runs stay within a few per
    cent of the rate, and a held TCP flow still gets windows of several segments)."""
    return min(BURST_MAX, max(BURST_FLOOR, int(rate / 8 * BURST_TIME)))


@dataclass(frozen=True, slots=True)
class RateSpec:
    """One limit as configured: `rate` in bit/s, `burst` in bytes."""

    rate: int
    burst: int

    @classmethod
    def of(cls, rate: int, burst: int = 0) -> RateSpec:
        """A spec with the default burst when `burst` is 0. Raises ValueError naming what is out of range."""
        if not RATE_MIN <= rate <= RATE_MAX:
            raise ValueError(f"rate {rate} bit/s is out of range {RATE_MIN}..{RATE_MAX} (0: unlimited)")
        if burst and not BURST_MIN <= burst <= BURST_MAX:
            raise ValueError(f"burst {burst} bytes is out of range {BURST_MIN}..{BURST_MAX}")
        return cls(rate, burst or default_burst(rate))


class TokenBucket:
    """Tokens are bytes. Starts full. `tokens` may be negative: bytes already carried beyond the budget
    (TCP data the guest sent inside an earlier window) are a debt paid back before anything else passes."""

    __slots__ = ("burst", "bytes_per_s", "quantum", "rate", "stamp", "tokens")

    def __init__(self, spec: RateSpec, now: float) -> None:
        self.rate = spec.rate
        self.burst = spec.burst
        self.bytes_per_s = spec.rate / 8
        self.quantum = min(QUANTUM_MAX, max(1, spec.burst // 4))
        self.tokens = float(spec.burst)
        self.stamp = now

    def _refill(self, now: float) -> float:
        if now > self.stamp:
            tokens = self.tokens + (now - self.stamp) * self.bytes_per_s
            self.tokens = tokens if tokens < self.burst else float(self.burst)
            self.stamp = now
        return self.tokens

    def available(self, now: float) -> int:
        """Whole bytes that may pass now (0 while in debt)."""
        tokens = self._refill(now)
        return int(tokens) if tokens > 0 else 0

    def take(self, n: int, now: float) -> bool:
        """Spend `n` bytes if they are all there (a datagram passes whole or not at all)."""
        if self._refill(now) >= n:
            self.tokens -= n
            return True
        return False

    def charge(self, n: int, now: float) -> None:
        """Spend `n` bytes that passed already (TCP data accepted inside a window): may leave a debt."""
        self._refill(now)
        self.tokens -= n

    def wait(self, n: int, now: float) -> float:
        """Seconds until `n` bytes are available (`n` is capped at the burst: more never fit at once)."""
        need = min(n, self.burst) - self._refill(now)
        return need / self.bytes_per_s if need > 0 else 0.0

    def reopen(self, n: int, now: float) -> float:
        """When a flow held for `n` bytes should look again: `wait`, but at least WAIT_MIN (a shorter
        wait is lost in the float sum `now + wait` or the loop's millisecond clock, and would spin)."""
        wait = self.wait(n, now)
        return wait if wait > WAIT_MIN else WAIT_MIN

    def spec(self) -> RateSpec:
        return RateSpec(self.rate, self.burst)


def egress_window(bucket: TokenBucket, tokens: int, free: int, mss: int, now: float) -> tuple[int, float]:
    """(room to offer the guest, seconds until it is worth reopening; 0: not held) under `bucket`, which
    has `tokens` now, where the socket alone would allow `free` (more than `tokens`).

    A window smaller than one segment stalls a guest's sender (sender-side silly window avoidance: it
    waits for its persist timer), and a bucket may be smaller than a segment (16 KiB against a 64 KiB MSS
    at MTU 65520). So once a quantum (or the bucket, or `free`) is there, at least one segment is offered;
    what it takes beyond the tokens is charged as a debt, paid back before the next opening, so the rate
    over time stays exact."""
    need = min(free, max(bucket.quantum, mss), bucket.burst)
    if tokens >= need:
        return min(free, max(tokens, mss)), 0.0
    return tokens, bucket.reopen(need, now)


@dataclass(slots=True)
class Shaper:
    """The guest's two buckets and their counters, shared by the TCP core and the UDP and ICMP shells.

    Counters (keys of `counters`): `egress.bytes` / `ingress.bytes` carried under a limit; `tcp.egress.held`
    / `tcp.ingress.held` times a TCP flow waited for tokens and `tcp.*.held_us` the waits planned, in
    microseconds; `udp.egress.dropped`, `udp.ingress.dropped`, `icmp.egress.dropped`,
    `icmp.ingress.dropped` datagrams over the limit, and `..._bytes` of them."""

    egress: TokenBucket | None = None
    ingress: TokenBucket | None = None
    counters: Counter[str] = field(default_factory=Counter)

    def configure(self, egress: RateSpec | None, ingress: RateSpec | None, now: float) -> None:
        """Install new limits. A direction whose spec did not change keeps its bucket (and its balance), so
        re-applying the same configuration (SIGHUP) is not a free burst."""
        self.egress = _rebucket(self.egress, egress, now)
        self.ingress = _rebucket(self.ingress, ingress, now)

    def admit(self, bucket: TokenBucket, n: int, now: float, what: str) -> bool:
        """A datagram of `n` bytes through `bucket`; `what` ("udp.egress", ...) names its drop counters."""
        if bucket.take(n, now):
            self.counters[_BYTES[bucket is self.egress]] += n
            return True
        self.counters[what + ".dropped"] += 1
        self.counters[what + ".dropped_bytes"] += n
        return False

    def held(self, what: str, seconds: float) -> None:
        """A TCP flow (`what`: "tcp.egress" or "tcp.ingress") waits `seconds` for tokens."""
        self.counters[what + ".held"] += 1
        self.counters[what + ".held_us"] += int(seconds * 1e6)


_BYTES: Final = {True: "egress.bytes", False: "ingress.bytes"}


def _rebucket(bucket: TokenBucket | None, spec: RateSpec | None, now: float) -> TokenBucket | None:
    if spec is None:
        return None
    if bucket is not None and bucket.spec() == spec:
        return bucket
    return TokenBucket(spec, now)


_SUFFIX: Final = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_quantity(value: object) -> int:
    """A rate (bit/s) or burst (bytes) as the config file writes it: an integer, or a string with an
    optional decimal suffix k, M, G or T ("10M" is 10 000 000); "none" and 0 are 0. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError('expected a number or a string such as "10M", got a boolean')
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f'expected a number or a string such as "10M", got {type(value).__name__}')
    word = value.strip().lower()
    if word in ("none", "unlimited"):
        return 0
    number, suffix = (word[:-1], word[-1]) if word[-1:] in _SUFFIX else (word, "")
    try:
        scaled = float(number) * _SUFFIX[suffix]
    except ValueError:
        raise ValueError(f"{value[:40]!r} is not a number with an optional k, M, G or T suffix") from None
    if not 0 <= scaled < 2**63 or scaled != int(scaled):
        raise ValueError(f"{value[:40]!r} is not a whole, non-negative quantity")
    return int(scaled)
