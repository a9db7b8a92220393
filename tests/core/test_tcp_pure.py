"""The TCP core's pure helpers: RFC 6298 timing, the ACK/window policy, and the flow deadline."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.core.tcp import states
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.tcp.rto import backoff, rtt_sample
from passtd.dataplane.core.tcp.timers import expired, flow_deadline
from passtd.dataplane.core.tcp.window import MAX_WINDOW, ack_window, socket_room
from passtd.dataplane.core.timeouts import Timeouts


def test_first_rtt_sample_sets_srtt_and_half_of_it_as_variance() -> None:
    srtt, rttvar, rto = rtt_sample(0.0, 0.0, 0.1, 0.2, 60.0)
    assert srtt == 0.1 and rttvar == 0.05
    assert rto == pytest.approx(0.3)  # SRTT + 4 RTTVAR (RFC 6298 §2.2)


def test_later_samples_are_smoothed_and_the_rto_is_clamped() -> None:
    srtt, rttvar, _ = rtt_sample(0.1, 0.05, 0.3, 0.2, 60.0)
    assert rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.2)
    assert srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.3)
    assert rtt_sample(0.0, 0.0, 0.0001, 0.2, 60.0)[2] == 0.2  # the minimum
    assert rtt_sample(0.0, 0.0, 100.0, 0.2, 60.0)[2] == 60.0  # the maximum


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert backoff(1.0, 60.0) == 2.0 and backoff(40.0, 60.0) == 60.0


def test_local_peer_counts_everything_written_and_remote_only_what_it_acked() -> None:
    assert socket_room(1000, 400, 4000, local=True) == (1000, 2400, 600)
    assert socket_room(1000, 400, 4000, local=False) == (400, 2400, 600)
    assert socket_room(1000, 5000, 4000, local=False) == (1000, 3000, 0)  # never beyond what was written
    assert socket_room(10000, 0, 4000, local=False)[1] == 0


def test_ack_covers_the_fin_only_once_every_byte_is_acknowledged() -> None:
    assert ack_window(100, 1102, 1000, 1000, 50, fin_relayed=True, scaled=True) == (1102, 50)
    assert ack_window(100, 1102, 1000, 600, 50, fin_relayed=True, scaled=True) == (701, 450)
    assert ack_window(100, 1101, 1000, 1000, 50, fin_relayed=False, scaled=True) == (1101, 50)


@given(st.integers(0, 1 << 30), st.integers(0, 1 << 30), st.integers(0, 1 << 26), st.booleans())
def test_window_never_exceeds_what_the_field_can_say(
    written: int, acked: int, free: int, scaled: bool
) -> None:
    acked = min(acked, written)
    _, wnd = ack_window(0, 0, written, acked, free, False, scaled)
    assert 0 <= wnd <= (MAX_WINDOW if scaled else 0xFFFF)


def test_flow_deadline_is_the_earliest_armed_timer() -> None:
    t = Timeouts(tcp_syn=240.0, tcp_activity=7200.0, tcp_fin=240.0)
    conn = TcpConn(1, 6, (6, b"", 0, 0), 0.0, 0.0)
    conn.events = states.EV_SYN_ACK_SENT
    assert flow_deadline(conn, t, 240.0) == 240.0
    assert flow_deadline(conn, t, 10.0) == 10.0  # the shorter handshake timeout under pressure
    conn.rto_due = 1.0
    assert flow_deadline(conn, t, 10.0) == 1.0
    assert not expired(conn, t, 10.0, 9.9) and expired(conn, t, 10.0, 10.0)


def test_a_new_connection_has_every_field_of_a_flow() -> None:
    """TcpConn and SpliceFlow set the base's fields in their own __init__ (for speed), so a field added to
    Flow must be added there too, or the flow table's generic code meets an unset attribute (as `tally`
    once did)."""
    import dataclasses

    from passtd.dataplane.core.flowtable import Flow
    from passtd.dataplane.core.splice import SpliceFlow

    for flow in (TcpConn(1, 6, (6, b"", 0, 0), 0.0, 0.0), SpliceFlow(2, 6, (6, b"", 0, 0), 0.0, 0.0)):
        missing = [f.name for f in dataclasses.fields(Flow) if not hasattr(flow, f.name)]
        assert missing == [], type(flow).__name__
