"""Retransmission timing (RFC 6298), as pure functions of plain numbers.

The flow keeps SRTT, RTTVAR and RTO (conn.py); these functions say how they change. Karn's rule (never time a
retransmitted segment) is the caller's: it times one segment at a time and forgets it on a rewind.
"""

from __future__ import annotations

from typing import Final

CLOCK_GRANULARITY: Final = 0.001  # G in RFC 6298 §2: the loop's clock is finer, 1 ms keeps RTO above SRTT


def rtt_sample(
    srtt: float, rttvar: float, r: float, rto_min: float, rto_max: float
) -> tuple[float, float, float]:
    """RFC 6298 §2.2-2.5: (SRTT, RTTVAR, RTO) after one RTT measurement `r` (srtt 0: the first one). A plain
    tuple: compiled, it is returned unboxed (a NamedTuple would be built by Python code on the ACK path)."""
    if srtt == 0.0:
        srtt, rttvar = r, r / 2
    else:
        rttvar = 0.75 * rttvar + 0.25 * abs(srtt - r)
        srtt = 0.875 * srtt + 0.125 * r
    return srtt, rttvar, clamp(srtt + max(CLOCK_GRANULARITY, 4 * rttvar), rto_min, rto_max)


def backoff(rto: float, rto_max: float) -> float:
    """RFC 6298 §5.5: the timer expired; the next one waits twice as long, up to the maximum."""
    return clamp(rto * 2, 0.0, rto_max)


def clamp(value: float, lo: float, hi: float) -> float:
    return lo if value < lo else hi if value > hi else value
