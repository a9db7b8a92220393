"""The transition table in states.py, row by row through the real core (with the fake socket): each row's
input applied in its state must give its effect and reach its next state. A new row needs a driver here."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from passtd.dataplane.core.tcp import base, states
from passtd.dataplane.core.tcp.seq import seq_add
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.packets.tcp import ACK, FIN, RST, SYN
from tests.helpers.tcpfake import FAR4, FakeSock, Rig

G_ISN = 1000
S = states.TcpState


class Flow:
    """A rig with one flow driven to a named state; `our` is our next sequence number toward the guest."""

    def __init__(self, state: S, timeouts: Timeouts | None = None) -> None:
        self.rig = Rig(timeouts=timeouts)
        self.our = 0
        self.sock = FakeSock()
        if state is S.CLOSED:
            return
        if state is S.SOCK_SYN_SENT:
            conn = self.rig.handler.accepted(self.sock, FAR4, 4000, 80, 0.0)
            assert conn is not None
            self.our = seq_add(self.rig.take()[0].tcp.seq, 1)
            return
        self.rig.guest(SYN, G_ISN)
        self.sock = self.rig.factory.socks[-1]
        if state is S.TAP_SYN_SENT:
            return
        self.rig.handler.sock_connected(self.rig.conn(), 0.0)
        self.our = seq_add(self.rig.take()[0].tcp.seq, 1)
        if state is S.TAP_SYN_RCVD:
            return
        self.ack()
        if state is S.ESTABLISHED:
            return
        if state in (S.FIN_WAIT_1, S.LAST_ACK):
            self.guest_fin()
            if state is S.LAST_ACK:
                self.host_eof()
            self.rig.take()
            return
        self.host_eof()
        if state is S.CLOSE_WAIT:
            self.ack()
        self.rig.take()

    @property
    def state(self) -> str:
        flows = list(self.rig.flows)
        return states.state_name(self.rig.conn().events) if flows else S.CLOSED.value

    def ack(self, now: float = 0.1) -> None:
        self.rig.guest(ACK, self.guest_seq(), self.our, now=now)

    def guest_seq(self) -> int:
        return self.rig.conn().seq_from_tap if list(self.rig.flows) else G_ISN + 1

    def guest_fin(self, now: float = 0.2) -> None:
        self.rig.guest(FIN | ACK, self.guest_seq(), self.our, now=now)

    def host_eof(self) -> None:
        self.sock.eof = True
        self.rig.handler.sock_readable(self.rig.conn(), 0.3, eof=True)
        (fin,) = [s for s in self.rig.take() if s.flags & FIN]
        self.our = seq_add(fin.tcp.seq, 1)

    def sent(self) -> list[int]:
        return [s.flags for s in self.rig.take()]


def _syn(f: Flow) -> None:
    f.rig.guest(SYN, G_ISN)
    assert len(f.rig.factory.socks) == 1 and f.sent() == []


def _syn_capped(f: Flow) -> None:
    f.rig.handler.set_half_open_limits(cap=0, pressure=0)
    f.rig.guest(SYN, G_ISN)
    assert f.rig.factory.socks == [] and f.sent() == [RST | ACK]


def _connected(f: Flow) -> None:
    f.rig.handler.sock_connected(f.rig.conn(), 0.0)
    assert f.sent() == [SYN | ACK] and f.rig.conn().rto_due == 1.0


def _connect_failed(f: Flow) -> None:
    f.rig.handler.sock_error(f.rig.conn(), "connect_failed:ECONNREFUSED", 0.0)
    assert f.sent() == [RST | ACK]


def _ack_of_syn(f: Flow) -> None:
    f.sock.rx += b"banner"  # the host peer speaks first, before the guest's ACK: the socket signals it
    f.rig.handler.sock_readable(f.rig.conn(), 0.0)
    f.ack()
    assert [s.data for s in f.rig.take()] == [b"banner"]


def _bad_ack(f: Flow) -> None:
    f.rig.guest(ACK, G_ISN + 1, seq_add(f.our, 7))
    assert f.sent() == [RST | ACK] and f.sock.was_reset


def _syn_again(f: Flow) -> None:
    f.rig.guest(SYN, G_ISN)
    assert f.sent() == [SYN | ACK]


def _rto(f: Flow) -> None:
    f.rig.handler.on_timer(f.rig.handler.next_deadline())
    assert f.sent() in ([SYN | ACK], [SYN]) and f.rig.conn().rto == 2.0


def _rto_exhausted(f: Flow) -> None:
    f.rig.handler.timeouts = Timeouts(tcp_max_retransmits=1)
    for _ in range(3):
        f.rig.handler.on_timer(f.rig.handler.next_deadline())
    assert f.sent()[-1] & RST and f.sock.was_reset


def _accepted(f: Flow) -> None:
    assert f.rig.handler.accepted(f.sock, FAR4, 4000, 80, 0.0) is not None
    assert f.sent() == [SYN] and f.rig.handler.next_deadline() == 1.0


def _syn_ack(f: Flow) -> None:
    f.rig.guest(SYN | ACK, 9000, f.our, sport=80, dport=4000, dst=FAR4)
    assert f.sent() == [ACK]


def _handshake_timeout(f: Flow) -> None:
    f.rig.handler.on_timer(f.rig.handler.timeouts.tcp_syn)
    assert f.sent() == [RST | ACK] and f.sock.was_reset


def _host_eof(f: Flow) -> None:
    f.sock.eof = True
    f.rig.handler.sock_readable(f.rig.conn(), 0.3, eof=True)
    assert f.sent() == [FIN | ACK]


def _ack_of_fin(f: Flow) -> None:
    f.ack()
    assert f.sent() == [] and not f.sock.closed


def _last_ack(f: Flow) -> None:
    f.ack()
    assert f.sent() == [] and f.sock.closed and not f.sock.was_reset


def _guest_fin(f: Flow) -> None:
    f.guest_fin()
    assert f.sock.shut_wr and f.sent() == [ACK]


def _fin_in_time_wait(f: Flow) -> None:
    f.guest_fin()
    f.rig.take()
    f.rig.guest(FIN | ACK, G_ISN + 1, f.our, now=1.0)
    assert f.sent() == [ACK]


def _guest_fin_again(f: Flow) -> None:
    f.rig.guest(FIN | ACK, G_ISN + 1, f.our, now=0.5)
    assert f.sent() == [ACK]


def _guest_rst(f: Flow) -> None:
    f.rig.guest(RST, f.guest_seq())
    assert f.sent() == [] and f.sock.was_reset


def _sock_error(f: Flow) -> None:
    f.sock.fail = ConnectionResetError(errno.ECONNRESET, "reset")
    f.rig.handler.sock_readable(f.rig.conn(), 0.4)
    assert f.sent() == [RST | ACK]


DRIVERS: dict[tuple[S, str], tuple[S, Callable[[Flow], None]]] = {
    (S.CLOSED, "guest SYN"): (S.CLOSED, _syn),
    (S.CLOSED, "guest SYN, half-open cap reached"): (S.CLOSED, _syn_capped),
    (S.TAP_SYN_SENT, "connect() completed"): (S.TAP_SYN_SENT, _connected),
    (S.TAP_SYN_SENT, "connect() failed"): (S.TAP_SYN_SENT, _connect_failed),
    (S.TAP_SYN_RCVD, "guest ACK of our SYN"): (S.TAP_SYN_RCVD, _ack_of_syn),
    (S.TAP_SYN_RCVD, "guest ACK of something else"): (S.TAP_SYN_RCVD, _bad_ack),
    (S.TAP_SYN_RCVD, "guest SYN again"): (S.TAP_SYN_RCVD, _syn_again),
    (S.TAP_SYN_RCVD, "RTO"): (S.TAP_SYN_RCVD, _rto),
    (S.TAP_SYN_RCVD, "RTO, retransmissions exhausted"): (S.TAP_SYN_RCVD, _rto_exhausted),
    (S.CLOSED, "host peer accepted"): (S.CLOSED, _accepted),
    (S.SOCK_SYN_SENT, "guest SYN-ACK"): (S.SOCK_SYN_SENT, _syn_ack),
    (S.SOCK_SYN_SENT, "RTO"): (S.SOCK_SYN_SENT, _rto),
    (S.SOCK_SYN_SENT, "RTO, retransmissions exhausted"): (S.SOCK_SYN_SENT, _rto_exhausted),
    (S.TAP_SYN_SENT, "handshake timeout"): (S.TAP_SYN_SENT, _handshake_timeout),
    (S.ESTABLISHED, "host end of stream"): (S.ESTABLISHED, _host_eof),
    (S.ESTABLISHED_SOCK_FIN, "guest ACK of our FIN"): (S.ESTABLISHED_SOCK_FIN, _ack_of_fin),
    (S.CLOSE_WAIT, "guest FIN"): (S.CLOSE_WAIT, _guest_fin),
    (S.CLOSED, "guest FIN again (time-wait)"): (S.CLOSE_WAIT, _fin_in_time_wait),
    (S.ESTABLISHED, "guest FIN"): (S.ESTABLISHED, _guest_fin),
    (S.FIN_WAIT_1, "guest FIN again"): (S.FIN_WAIT_1, _guest_fin_again),
    (S.FIN_WAIT_1, "host end of stream"): (S.FIN_WAIT_1, _host_eof),
    (S.LAST_ACK, "guest ACK of our FIN"): (S.LAST_ACK, _last_ack),
    (S.ESTABLISHED, "guest RST"): (S.ESTABLISHED, _guest_rst),
    (S.ESTABLISHED, "socket error"): (S.ESTABLISHED, _sock_error),
}


def test_every_row_has_a_driver_and_every_driver_a_row() -> None:
    assert {(t.state, t.input) for t in states.TRANSITIONS} == set(DRIVERS)


@pytest.mark.parametrize("row", states.TRANSITIONS, ids=lambda t: f"{t.state}: {t.input}")
def test_transition(row: states.Transition) -> None:
    start, drive = DRIVERS[(row.state, row.input)]
    flow = Flow(start)
    if start is not row.state:  # the time-wait row starts from the flow it outlives
        assert row.state is S.CLOSED
    else:
        assert flow.state == row.state.value
    drive(flow)
    assert flow.state == row.next.value


def test_state_names_and_event_bits_are_distinct_vocabularies() -> None:
    names = {s.value for s in S}
    assert names == set(states.STATE_NAMES)
    # No event bit shares a name with a state, but for the one that means the same on both sides.
    assert names & {e.name for e in states.TcpEv} == {"ESTABLISHED"}
    assert base.HALF_OPEN_MAX > base.HALF_OPEN_PRESSURE > 0
