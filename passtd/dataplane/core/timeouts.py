"""Every timeout of the dataplane in one object, read by the timers at each tick.

The control plane replaces the object (it is immutable) and the next tick uses the new values, so a change
applies without touching any flow. Values are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final


@dataclass(frozen=True, slots=True)
class Timeouts:
    tcp_syn: float = 240.0  # handshake not completed (passt SYN_TIMEOUT)
    tcp_fin: float = 240.0  # half-closed or waiting for the last ACK (passt FIN_TIMEOUT)
    tcp_activity: float = 7200.0  # no traffic either way (passt ACT_TIMEOUT)
    tcp_ack_interval: float = 0.020  # how often to re-check TCP_INFO while the guest waits for an ACK
    tcp_rto_initial: float = 1.0  # RFC 6298 §2.1
    tcp_rto_min: float = 0.2  # Linux's minimum; RFC 6298 §2.4 allows below 1 s
    tcp_rto_max: float = 60.0  # RFC 6298 §2.5
    tcp_max_retransmits: int = 12  # then both sides are reset
    udp_idle: float = 180.0
    icmp_idle: float = 60.0


# Allowed ranges, checked by the control plane before it replaces the object: (min, max) per field.
RANGES: Final[dict[str, tuple[float, float]]] = {
    "tcp_syn": (1.0, 3600.0),
    "tcp_fin": (1.0, 3600.0),
    "tcp_activity": (1.0, 7 * 86400.0),
    "tcp_ack_interval": (0.001, 1.0),
    "tcp_rto_initial": (0.01, 60.0),
    "tcp_rto_min": (0.001, 60.0),
    "tcp_rto_max": (0.1, 600.0),
    "tcp_max_retransmits": (1, 100),
    "udp_idle": (1.0, 86400.0),
    "icmp_idle": (1.0, 86400.0),
}
assert set(RANGES) == {f.name for f in fields(Timeouts)}
