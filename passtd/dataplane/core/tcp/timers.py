"""When a flow next needs the timer, as a pure function of its fields and the timeouts.

One deadline per flow goes into the handler's heap (the shell arms one `call_at` for the earliest); what is
due at that moment is decided by the handler's `_timer`. Every timer of a flow is here: the activity timeout,
the retransmission timer (data, SYN or SYN-ACK), the delayed ACK re-check, the zero-window probe, and the
handshake and FIN timeouts.
"""

from __future__ import annotations

from passtd.dataplane.core.tcp import states as st
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.timeouts import Timeouts


def flow_deadline(conn: TcpConn, t: Timeouts, syn_timeout: float) -> float:
    """The earliest of the flow's armed timers; `syn_timeout` is the handshake timeout that applies to it."""
    ev = conn.events
    due = (conn.last_tap if conn.last_tap > conn.last_sock else conn.last_sock) + t.tcp_activity
    # Written out rather than a loop over a tuple: compiled, this stays unboxed floats (it runs per frame).
    d = conn.rto_due
    if d and d < due:
        due = d
    d = conn.ack_due
    if d and d < due:
        due = d
    d = conn.persist_due
    if d and d < due:
        due = d
    if ev & st.EV_HANDSHAKE and conn.created + syn_timeout < due:
        due = conn.created + syn_timeout
    if ev & st.EV_CLOSING and conn.fin_since + t.tcp_fin < due:
        due = conn.fin_since + t.tcp_fin
    return due


def expired(conn: TcpConn, t: Timeouts, syn_timeout: float, now: float) -> bool:
    """Whether the flow is given up: handshake, FIN or activity timeout."""
    ev = conn.events
    if ev & st.EV_HANDSHAKE and now >= conn.created + syn_timeout:
        return True
    if ev & st.EV_CLOSING and now >= conn.fin_since + t.tcp_fin:
        return True
    return now >= max(conn.last_tap, conn.last_sock) + t.tcp_activity
