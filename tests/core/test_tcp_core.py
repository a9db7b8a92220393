"""The TCP core as scripts: guest segments in, host-socket calls and guest segments out."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passtd.dataplane.core.tcp import base as base_mod
from passtd.dataplane.core.tcp import batch as batch_mod
from passtd.dataplane.core.tcp import handshake as handshake_mod
from passtd.dataplane.core.tcp import states
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.tcp.seq import MASK, seq_add, seq_diff, seq_le, seq_lt
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.packets.tcp import ACK, FIN, PSH, RST, SYN
from tests.helpers.tcpfake import FAR4, GUEST4, GW4, FakeSock, Rig

G_ISN = 1000


def established(rig: Rig, now: float = 0.0, window: int = 65535, dst: bytes = GW4) -> tuple[int, FakeSock]:
    """Guest SYN → connect → SYN-ACK → guest ACK; returns our ISN + 1 and the fake socket."""
    rig.dst = dst
    rig.guest(SYN, G_ISN, window=window, now=now)
    assert rig.take() == []  # nothing until connect() completes
    sock = rig.factory.socks[-1]
    rig.handler.sock_connected(rig.conn(), now)
    (synack,) = rig.take()
    assert synack.flags == SYN | ACK and synack.tcp.ack == G_ISN + 1
    rig.guest(ACK, G_ISN + 1, seq_add(synack.tcp.seq, 1), window=window, now=now)
    assert rig.conn().events & states.EV_ESTABLISHED
    return seq_add(synack.tcp.seq, 1), sock


def test_guest_syn_to_gateway_connects_to_loopback_and_answers_with_our_options() -> None:
    rig = Rig()
    rig.guest(SYN, G_ISN, mss=1400, ws=7)
    conn = rig.conn()
    assert conn.target_addr == bytes((127, 0, 0, 1)) and conn.remote_port == 5000
    assert states.state_name(conn.events) == "TAP_SYN_SENT"
    rig.handler.sock_connected(conn, 0.0)
    (synack,) = rig.take()
    assert (synack.src, synack.dst, synack.tcp.sport, synack.tcp.dport) == (GW4, GUEST4, 5000, 40000)
    assert synack.tcp.mss == 1460 and synack.tcp.ws == handshake_mod.OUR_WS
    assert states.state_name(conn.events) == "TAP_SYN_RCVD"
    rig.guest(ACK, G_ISN + 1, seq_add(synack.tcp.seq, 1))
    assert states.state_name(conn.events) == "ESTABLISHED"
    assert rig.factory.socks[0].mss == 0  # a loopback peer keeps its large MSS
    remote = Rig()
    established(remote, dst=FAR4)
    assert remote.factory.socks[0].mss == 1460  # the guest's MSS mirrored onto a socket toward the network


def test_remote_destination_keeps_its_address() -> None:
    rig = Rig()
    rig.guest(SYN, G_ISN, dst=FAR4)
    assert rig.conn().target_addr == FAR4


def test_refused_connect_is_answered_with_rst_at_once() -> None:
    rig = Rig()
    rig.factory.refuse = OSError(errno.ECONNREFUSED, "refused")
    rig.guest(SYN, G_ISN)
    (rst,) = rig.take()
    assert rst.flags & RST and rst.tcp.ack == G_ISN + 1
    assert len(rig.flows) == 0
    rig2 = Rig()
    rig2.guest(SYN, G_ISN)
    rig2.handler.sock_error(rig2.conn(), "connect_failed:ECONNREFUSED", 0.1)
    (rst,) = rig2.take()
    assert rst.flags & RST and rst.tcp.ack == G_ISN + 1 and len(rig2.flows) == 0


def test_segment_without_flow_gets_rst() -> None:
    rig = Rig()
    rig.guest(ACK, 5, ack=777, data=b"x")
    (rst,) = rig.take()
    assert rst.flags == RST and rst.tcp.seq == 777
    rig.guest(RST, 5)
    assert rig.take() == []  # never an RST for an RST


def test_guest_data_is_written_and_acked_only_when_the_peer_acked() -> None:
    rig = Rig()
    our, sock = established(rig, dst=FAR4)
    rig.take()
    sock.acked = 0
    rig.guest(ACK | PSH, G_ISN + 1, our, b"hello")
    assert bytes(sock.tx) == b"hello"
    (ack,) = rig.take()
    assert ack.tcp.ack == G_ISN + 1  # the peer has not acknowledged yet
    conn = rig.conn()
    assert conn.ack_due == pytest.approx(0.02)
    sock.acked = 5
    rig.handler.on_timer(0.03)
    (ack,) = rig.take()
    assert ack.tcp.ack == G_ISN + 6 and conn.ack_due == 0.0
    # A peer on this host: what its kernel took is acknowledged at once.
    local = Rig()
    our, sock = established(local)
    local.take()
    sock.acked = 0
    local.guest(ACK | PSH, G_ISN + 1, our, b"hello")
    assert local.take()[-1].tcp.ack == G_ISN + 6


def test_out_of_order_and_duplicate_guest_data() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    rig.guest(ACK, G_ISN + 11, our, b"later")  # a gap: dropped, duplicate ACK
    assert sock.tx == b"" and rig.take()[0].tcp.ack == G_ISN + 1
    rig.guest(ACK, G_ISN + 1, our, b"0123456789")
    rig.guest(ACK, G_ISN + 6, our, b"56789abcde")  # overlaps: only the new part is written
    assert bytes(sock.tx) == b"0123456789abcde"


def test_socket_full_stops_acking() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.capacity = 3
    rig.guest(ACK, G_ISN + 1, our, b"abcdef")
    assert bytes(sock.tx) == b"abc"
    assert rig.take()[-1].tcp.ack == G_ISN + 4  # the rest is not acknowledged; the guest resends it
    sock.capacity = 100
    rig.guest(ACK, G_ISN + 1, our, b"abcdef")
    assert bytes(sock.tx) == b"abcdef"


def test_host_data_segmented_by_mss_and_discarded_only_when_acked() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.rx += bytes(range(256)) * 20  # 5120 bytes
    rig.handler.sock_readable(rig.conn(), 0.1)
    segs = rig.take()
    assert [len(s.data) for s in segs] == [1460, 1460, 1460, 740]
    assert b"".join(s.data for s in segs) == bytes(range(256)) * 20
    assert segs[-1].flags & PSH and sock.discarded == 0
    rig.guest(ACK, G_ISN + 1, seq_add(our, 2920))
    assert sock.discarded == 2920


def test_two_duplicate_acks_rewind_and_resend() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.rx += b"a" * 3000
    rig.handler.sock_readable(rig.conn(), 0.1)
    rig.take()
    rig.guest(ACK, G_ISN + 1, seq_add(our, 1460))
    rig.guest(ACK, G_ISN + 1, seq_add(our, 1460))
    assert rig.take() == []
    rig.guest(ACK, G_ISN + 1, seq_add(our, 1460))
    again = rig.take()
    assert [s.tcp.seq for s in again] == [seq_add(our, 1460), seq_add(our, 2920)]
    assert rig.conn().total_retransmits == 1


def test_rto_retransmits_with_backoff_then_resets() -> None:
    rig = Rig(timeouts=Timeouts(tcp_max_retransmits=3))
    our, sock = established(rig)
    rig.take()
    sock.rx += b"z" * 100
    rig.handler.sock_readable(rig.conn(), 0.0)
    rig.take()
    conn = rig.conn()
    assert conn.rto == 1.0 and conn.rto_due == 1.0
    times = []
    now = 0.0
    for _ in range(3):
        now = rig.handler.next_deadline()
        rig.handler.on_timer(now)
        (seg,) = rig.take()
        assert seg.tcp.seq == our and seg.data == b"z" * 100
        times.append(now)
    assert times == [1.0, 3.0, 7.0]  # exponential backoff
    rig.handler.on_timer(rig.handler.next_deadline())
    (rst,) = rig.take()
    assert rst.flags & RST and sock.was_reset and rig.closed[-1][1] == "timeout"


def test_rtt_sample_sets_rto() -> None:
    rig = Rig()
    our, sock = established(rig)
    sock.rx += b"q" * 10
    rig.handler.sock_readable(rig.conn(), 1.0)
    rig.guest(ACK, G_ISN + 1, seq_add(our, 10), now=1.05)
    conn = rig.conn()
    assert conn.srtt == pytest.approx(0.05)
    assert conn.rto == pytest.approx(0.2)  # clamped to the minimum


def test_zero_window_stops_then_probe_then_resumes() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    rig.guest(ACK, G_ISN + 1, our, window=0)
    sock.rx += b"w" * 2000
    rig.handler.sock_readable(rig.conn(), 0.0)
    assert rig.take() == []
    now = rig.handler.next_deadline()
    rig.handler.on_timer(now)
    (probe,) = rig.take()
    assert probe.data == b"" and probe.tcp.seq == seq_add(our, -1 & MASK)
    rig.guest(ACK, G_ISN + 1, our, window=10, now=now + 0.1)
    segs = rig.take()
    assert sum(len(s.data) for s in segs) == 10 * 2**7  # scaled window (ws 7)


def test_guest_half_close_then_host_reply_then_close() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    rig.guest(FIN | ACK, G_ISN + 1, our, b"req")
    assert sock.shut_wr and bytes(sock.tx) == b"req"
    conn = rig.conn()
    assert states.state_name(conn.events) == "FIN_WAIT_1"
    assert rig.take()[-1].tcp.ack == G_ISN + 5  # data + FIN
    sock.rx += b"reply" * 1000
    rig.handler.sock_readable(conn, 0.1)
    segs = rig.take()
    assert b"".join(s.data for s in segs) == b"reply" * 1000
    sock.eof = True
    rig.handler.sock_readable(conn, 0.15, eof=True)  # the peer's FIN is signalled (EPOLLRDHUP)
    (fin,) = rig.take()
    assert fin.flags & FIN and fin.tcp.seq == seq_add(our, 5000)
    assert states.state_name(conn.events) == "LAST_ACK"
    rig.guest(ACK, G_ISN + 5, seq_add(our, 5001), now=0.3)
    assert len(rig.flows) == 0 and sock.closed and not sock.was_reset
    assert rig.closed == [(conn.flow_id, "fin")]


def test_host_closes_first_guest_keeps_sending() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.eof = True
    conn = rig.conn()
    rig.handler.sock_readable(conn, 0.0)
    (fin,) = rig.take()
    assert fin.flags & FIN
    rig.guest(ACK, G_ISN + 1, seq_add(our, 1))
    assert states.state_name(conn.events) == "CLOSE_WAIT"
    rig.guest(ACK, G_ISN + 1, seq_add(our, 1), b"more data")
    assert bytes(sock.tx) == b"more data"
    rig.guest(FIN | ACK, G_ISN + 10, seq_add(our, 1))
    assert sock.shut_wr and len(rig.flows) == 0


def test_guest_rst_resets_the_socket() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.guest(RST, G_ISN + 1, our)
    assert sock.was_reset and len(rig.flows) == 0 and rig.closed[-1][1] == "rst_from_guest"


def test_host_error_sends_rst_to_guest() -> None:
    rig = Rig()
    _, sock = established(rig)
    rig.take()
    sock.fail = ConnectionResetError(errno.ECONNRESET, "reset")
    rig.handler.sock_readable(rig.conn(), 0.0)
    (rst,) = rig.take()
    assert rst.flags & RST and len(rig.flows) == 0


def test_host_initiated_flow() -> None:
    rig = Rig()
    sock = FakeSock()
    conn = rig.handler.accepted(sock, bytes((127, 0, 0, 1)), 33333, 8080, 0.0)
    assert conn is not None
    (syn,) = rig.take()
    assert syn.flags == SYN and syn.src == GW4 and syn.tcp.sport == 33333 and syn.tcp.dport == 8080
    assert states.state_name(conn.events) == "SOCK_SYN_SENT"
    rig.guest(SYN | ACK, 9000, seq_add(syn.tcp.seq, 1), sport=8080, dport=33333)
    assert states.state_name(conn.events) == "ESTABLISHED"
    (ack,) = rig.take()
    assert ack.flags == ACK and ack.tcp.ack == 9001
    sock.rx += b"hi"
    rig.handler.sock_readable(conn, 0.1)
    assert rig.take()[0].data == b"hi"


def test_host_initiated_syn_retransmitted_then_given_up() -> None:
    rig = Rig(timeouts=Timeouts(tcp_max_retransmits=2))
    sock = FakeSock()
    rig.handler.accepted(sock, FAR4, 1, 80, 0.0)
    rig.take()
    for expected in (1.0, 3.0):
        assert rig.handler.next_deadline() == expected
        rig.handler.on_timer(expected)
        assert rig.take()[0].flags == SYN
    rig.handler.on_timer(rig.handler.next_deadline())
    assert sock.was_reset and len(rig.flows) == 0


def test_syn_timeout_and_activity_timeout() -> None:
    rig = Rig(timeouts=Timeouts(tcp_syn=5.0, tcp_activity=50.0))
    rig.guest(SYN, G_ISN)
    rig.handler.on_timer(5.0)
    assert len(rig.flows) == 0 and rig.closed[-1][1] == "timeout"
    rig2 = Rig(timeouts=Timeouts(tcp_activity=50.0))
    established(rig2)
    rig2.handler.on_timer(49.0)
    assert len(rig2.flows) == 1
    rig2.handler.on_timer(rig2.handler.next_deadline())
    assert len(rig2.flows) == 0


def test_sequence_numbers_wrap() -> None:
    rig = Rig()
    rig.handler.isn = lambda *a: 0xFFFFFF00
    g_isn = 0xFFFFFFF0
    rig.guest(SYN, g_isn)
    sock = rig.factory.socks[0]
    rig.handler.sock_connected(rig.conn(), 0.0)
    rig.take()
    rig.guest(ACK, seq_add(g_isn, 1), 0xFFFFFF01)
    rig.guest(ACK, seq_add(g_isn, 1), 0xFFFFFF01, b"x" * 100)
    assert rig.take()[-1].tcp.ack == seq_add(g_isn, 101)
    sock.rx += b"y" * 1000
    rig.handler.sock_readable(rig.conn(), 0.0)
    rig.take()
    rig.guest(ACK, seq_add(g_isn, 101), seq_add(0xFFFFFF01, 1000))
    assert sock.discarded == 1000


@given(a=st.integers(0, MASK), n=st.integers(-(2**31) + 1, 2**31 - 1))
def test_seq_arithmetic_across_the_wrap(a: int, n: int) -> None:
    b = seq_add(a, n)
    assert seq_diff(b, a) == n
    assert seq_lt(a, b) == (n > 0)
    assert seq_le(a, b) == (n >= 0)


def test_state_rules() -> None:
    ev = states.set_event(0, states.EV_GUEST_SYN)
    ev = states.set_event(ev, states.EV_SYN_ACK_SENT)
    assert ev == states.EV_SYN_ACK_SENT  # rule 1
    ev = states.set_event(ev, states.EV_ESTABLISHED)
    assert ev == states.EV_ESTABLISHED
    with pytest.raises(ValueError, match="HOST_FIN_SENT before HOST_FIN"):
        states.set_event(ev, states.EV_HOST_FIN_SENT)  # rule 2
    for bit in (states.EV_HOST_FIN, states.EV_HOST_FIN_SENT, states.EV_GUEST_ACKED_FIN, states.EV_GUEST_FIN):
        ev = states.set_event(ev, bit)
    assert not states.is_closed(ev)
    assert states.is_closed(states.set_event(ev, states.EV_GUEST_FIN_SENT))  # rule 3
    assert {states.state_name(e) for e in range(states.EV_ALL + 1)} <= set(states.STATE_NAMES)


# -- sweep: every reachable state against every input ------------------------------------------------------

INPUTS = ["syn", "ack", "data", "fin", "rst", "dup", "readable", "eof", "timer", "garbage_ack", "full"]


def drive(rig: Rig, our: int, sock: FakeSock, step: str, arg: int, now: float) -> None:
    conn = next(iter(rig.flows), None)
    if conn is None:
        return
    seq = rig.conn().seq_from_tap
    if step == "syn":
        rig.guest(SYN, G_ISN, now=now)
    elif step == "ack":
        rig.guest(ACK, seq, seq_add(rig.conn().seq_ack_from_tap, arg % 3000), window=arg % 65536, now=now)
    elif step == "data":
        rig.guest(ACK | PSH, seq, rig.conn().seq_ack_from_tap, b"d" * (arg % 2000 + 1), now=now)
    elif step == "fin":
        rig.guest(FIN | ACK, seq, rig.conn().seq_ack_from_tap, now=now)
    elif step == "rst":
        rig.guest(RST, seq, now=now)
    elif step == "dup":
        rig.guest(ACK, seq, rig.conn().seq_ack_from_tap, now=now)
    elif step == "readable":
        sock.rx += b"r" * (arg % 5000)
        rig.handler.sock_readable(rig.conn(), now)
    elif step == "eof":
        sock.eof = True
        rig.handler.sock_readable(rig.conn(), now)
    elif step == "timer":
        rig.handler.on_timer(now)
    elif step == "garbage_ack":
        rig.guest(ACK, (seq + arg) & MASK, arg * 7919 & MASK, b"g", now=now)
    elif step == "full":
        sock.capacity = arg % 5


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(INPUTS), st.integers(0, 1 << 20)), max_size=25))
def test_sweep_every_state_against_every_input(steps: list[tuple[str, int]]) -> None:
    rig = Rig()
    our, sock = established(rig)
    delivered = 0
    now = 0.0
    for step, arg in steps:
        now += 0.05 + (arg % 7)
        drive(rig, our, sock, step, arg, now)
        for seg in rig.take():
            if seg.data:
                # Never send the guest bytes the socket did not deliver (they all read b"r").
                assert set(seg.data) == {ord("r")}
            delivered += len(seg.data)
        if len(rig.flows):
            conn = rig.conn()
            assert conn.in_flight <= len(sock.rx) + 1  # never discarded what the guest did not acknowledge
            assert states.state_name(conn.events) in states.STATE_NAMES
            assert conn.sock is sock
        else:
            assert sock.closed
            break


def test_window_updates_are_not_duplicate_acks() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.rx += b"a" * 3000
    rig.handler.sock_readable(rig.conn(), 0.1)
    rig.take()
    for window in (60000, 50000, 40000):  # the guest's buffer fills: same ACK, smaller window each time
        rig.guest(ACK, G_ISN + 1, our, window=window)
    assert rig.take() == [] and rig.conn().total_retransmits == 0


def test_after_a_timeout_one_segment_then_slow_start() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.rx += b"s" * 14600
    rig.handler.sock_readable(rig.conn(), 0.0)
    assert len(rig.take()) == 10
    rig.handler.on_timer(rig.handler.next_deadline())
    (again,) = rig.take()  # one segment, not the whole window
    assert again.tcp.seq == our and len(again.data) == 1460
    rig.guest(ACK, G_ISN + 1, seq_add(our, 1460), now=2.0)
    assert [len(s.data) for s in rig.take()] == [1460, 1460]  # the window doubles per ACK round


def test_a_full_tap_holds_data_until_it_drains() -> None:
    rig = Rig()
    full = [True]
    rig.handler.congested = lambda: full[0]
    _, sock = established(rig)
    rig.take()
    sock.rx += b"h" * 5000
    rig.handler.sock_readable(rig.conn(), 0.0)
    assert rig.take() == [] and rig.handler.has_blocked()
    full[0] = False
    rig.handler.unblock(0.1)
    assert sum(len(s.data) for s in rig.take()) == 5000 and not rig.handler.has_blocked()


def test_a_full_socket_buffer_closes_the_window_and_asks_to_hear_when_it_drains() -> None:
    rig = Rig()
    our, sock = established(rig, dst=FAR4)
    rig.take()
    sock.acked = 0
    for i in range(50):  # 3 000 000 bytes the far peer has not acknowledged yet
        rig.guest(ACK, G_ISN + 1 + i * 60000, our, b"x" * 60000, flush=False)
    rig.handler.flush(0.0)
    conn = rig.conn()
    ack = rig.take()[-1]
    assert ack.tcp.ack == G_ISN + 1
    assert conn.wnd_to_tap == (1 << 22) * 3 // 4  # (written - acked) + free: never more than the buffer holds
    assert rig.factory.writers[conn.flow_id] is True
    sock.acked = 3_000_000  # the peer caught up; the socket reports writable
    rig.handler.sock_writable(conn, 0.5)
    ack = rig.take()[-1]
    assert ack.tcp.ack == G_ISN + 1 + 3_000_000 and rig.factory.writers[conn.flow_id] is False


def test_an_answer_already_waiting_carries_the_ack_of_the_request() -> None:
    """prepare_acks holds the pure ACK; a data segment sent before emit_acks takes it along."""
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    rig.guest(ACK | PSH, G_ISN + 1, our, b"ping", flush=False)
    assert rig.handler.prepare_acks(0.0)
    assert rig.take() == []
    sock.rx += b"pong"
    rig.handler.sock_readable(rig.conn(), 0.0)
    rig.handler.emit_acks()
    (answer,) = rig.take()
    assert answer.data == b"pong" and answer.tcp.ack == G_ISN + 5
    # Nothing waiting: the held ACK goes out on its own.
    rig.guest(ACK | PSH, G_ISN + 5, seq_add(our, 4), b"ping", flush=False)
    assert rig.handler.prepare_acks(0.0)
    rig.handler.emit_acks()
    (ack,) = rig.take()
    assert ack.data == b"" and ack.tcp.ack == G_ISN + 9
    # Bulk data is not a request: no point looking for an answer (the ACK is still held and sent).
    bulk = b"x" * (batch_mod.ANSWER_HINT + 1)
    rig.guest(ACK, G_ISN + 9, seq_add(our, 8), bulk, flush=False)
    assert not rig.handler.prepare_acks(0.0)
    rig.handler.emit_acks()
    assert rig.take()[-1].tcp.ack == G_ISN + 9 + len(bulk)


def test_a_local_peers_window_is_estimated_until_half_the_room_is_used() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    reads = 0
    info = sock.info

    def counted() -> object:
        nonlocal reads
        reads += 1
        return info()

    sock.info = counted  # type: ignore[method-assign]
    sock.acked = 0  # the peer acknowledges nothing: the room shrinks with every write
    room = (1 << 22) * 3 // 4  # FakeSock's SO_SNDBUF, with the core's margin
    seq = G_ISN + 1
    chunk = b"x" * 60000
    windows = []
    for _ in range(40):
        rig.guest(ACK, seq, our, chunk)
        seq += len(chunk)
        windows.append(rig.take()[-1].tcp.window << handshake_mod.OUR_WS)
    assert windows == sorted(windows, reverse=True)  # never more room than there is
    assert reads < 40 // 2  # most ACKs were computed without TCP_INFO
    assert windows[-1] <= room - 40 * len(chunk) + (1 << handshake_mod.OUR_WS)


def test_data_and_fin_signalled_once_still_end_in_a_fin() -> None:
    """An answer and the peer's FIN in one readiness event: the peek returns the data only, and no further
    event comes, so the FIN must be found by a later peek (when the guest's ACK opens the way)."""
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.rx += b"answer"
    sock.eof = True
    rig.handler.sock_readable(rig.conn(), 0.1, eof=True)
    segs = rig.take()
    assert b"".join(s.data for s in segs) == b"answer"
    if not any(s.flags & FIN for s in segs):
        rig.guest(ACK, G_ISN + 1, seq_add(our, 6), now=0.2)
        assert any(s.flags & FIN for s in rig.take())


def test_a_lost_window_update_is_repeated_when_the_guest_probes() -> None:
    """The socket buffer closed the window, drained, and the ACK reopening it was lost: the guest then only
    sends zero-window probes (an old sequence number, no data; RFC 9293 §3.8.6.1). Each must be answered with
    our ACK and window (§3.10.7.4: an unacceptable segment gets an ACK), or both sides wait forever.
    This was the rare stall of test_transfers_survive_two_percent_loss."""
    rig = Rig()
    our, sock = established(rig)  # a peer on this host: the window is exactly the room in the socket buffer
    rig.take()
    sock.acked = 0  # the local reader is slow: what was written stays queued
    room = (1 << 22) * 3 // 4  # FakeSock's SO_SNDBUF, less the margin
    for off in range(0, room, 60000):
        rig.guest(ACK, G_ISN + 1 + off, our, b"x" * min(60000, room - off), flush=False)
    rig.handler.flush(0.0)
    conn = rig.conn()
    nxt = conn.seq_from_tap
    assert len(sock.tx) == room and rig.take()[-1].tcp.window == 0
    sock.acked = room  # the reader caught up: the socket is writable, the window reopens...
    rig.handler.sock_writable(conn, 0.1)
    (update,) = rig.take()
    assert update.tcp.ack == nxt and update.tcp.window > 0  # ...and this update is lost on the way
    rig.guest(ACK, seq_add(nxt, -1 & MASK), our, now=0.3)  # the guest's persist timer: a zero-window probe
    (answer,) = rig.take()
    assert answer.flags == ACK and answer.tcp.ack == nxt and answer.tcp.window == update.tcp.window
    rig.guest(ACK, seq_add(nxt, -1 & MASK), our, now=60.0)  # a keepalive has the same shape (RFC 9293 §3.8.4)
    assert [s.tcp.ack for s in rig.take()] == [nxt]
    rig.guest(ACK, nxt, our, now=60.1)  # an ordinary pure ACK is not answered
    assert rig.take() == []


def test_fin_is_sent_again_after_a_timeout_while_slow_start_limits_the_push() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.rx += b"f" * (6 * 1460)
    rig.handler.sock_readable(rig.conn(), 0.0)
    sock.eof = True
    rig.handler.sock_readable(rig.conn(), 0.0)
    fin_seq = seq_add(our, 6 * 1460)
    assert [s.tcp.seq for s in rig.take() if s.flags & FIN] == [fin_seq]
    now = rig.handler.next_deadline()
    rig.handler.on_timer(now)  # everything was lost: one segment, then slow start
    acked, fin_again = our, False
    for _ in range(10):  # the guest ACKs whatever arrives, in order
        segs = rig.take()
        assert segs, "nothing in flight and nothing sent: stalled"
        for s in segs:
            assert s.tcp.seq == acked
            acked = seq_add(acked, len(s.data) + (1 if s.flags & FIN else 0))
            fin_again = fin_again or bool(s.flags & FIN and s.tcp.seq == fin_seq)
        now += 0.01
        rig.guest(ACK, G_ISN + 1, acked, now=now)
        if fin_again:
            break
    assert fin_again and acked == seq_add(fin_seq, 1)
    assert rig.conn().events & states.EV_GUEST_ACKED_FIN


def test_a_lost_fast_retransmission_is_repaired_by_the_timer() -> None:
    """One rewind per window: later duplicate ACKs are ignored, so the RTO must still be armed."""
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.rx += b"d" * (10 * 1460)
    rig.handler.sock_readable(rig.conn(), 0.0)
    assert len(rig.take()) == 10
    for i in range(2):
        rig.guest(ACK, G_ISN + 1, our, now=0.01 * (i + 1))
    assert rig.take()[0].tcp.seq == our  # fast retransmission (lost again, say)
    for i in range(6):
        rig.guest(ACK, G_ISN + 1, our, now=0.1 + 0.01 * i)
    assert rig.take() == []  # echoes of the same loss
    conn = rig.conn()
    assert conn.rto_due and rig.handler.next_deadline() <= conn.rto_due
    rig.handler.on_timer(rig.handler.next_deadline())
    (seg,) = rig.take()
    assert seg.tcp.seq == our and len(seg.data) == 1460


def test_probes_while_data_is_in_flight_are_not_duplicate_acks() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.rx += b"d" * (4 * 1460)
    rig.handler.sock_readable(rig.conn(), 0.0)
    assert len(rig.take()) == 4
    for i in range(3):  # keepalives: an old sequence number, nothing acknowledged, same window
        rig.guest(ACK, G_ISN, our, now=0.01 * (i + 1))
    sent = rig.take()
    assert sent and all(not s.data for s in sent)  # answered with ACKs, never a retransmission
    assert rig.conn().total_retransmits == 0


def test_recover_follows_the_acks_across_the_sequence_wrap() -> None:
    """`recover` is compared modulo 2**32: left behind, fast retransmission would stop after 2 GiB."""
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    conn = rig.conn()
    acked = our
    for _ in range(3):  # 3 times 1 GiB acknowledged, as a long transfer would
        sock.rx += b"z" * 1460
        rig.handler.sock_readable(conn, 0.0)
        rig.take()
        acked = seq_add(acked, 1460)
        rig.guest(ACK, G_ISN + 1, acked)
        assert conn.recover == acked
        # jump a GiB ahead as if that much had been sent and acknowledged
        for attr in ("seq_to_tap", "seq_max_to_tap", "seq_ack_from_tap"):
            setattr(conn, attr, seq_add(getattr(conn, attr), 1 << 30))
        acked = seq_add(acked, 1 << 30)
    sock.rx += b"y" * (4 * 1460)
    rig.handler.sock_readable(conn, 0.0)
    rig.take()
    for i in range(2):
        rig.guest(ACK, G_ISN + 1, acked, now=0.01 * (i + 1))
    assert rig.take()[0].tcp.seq == acked  # two duplicate ACKs still rewind


def test_a_batch_beyond_tx_flush_is_written_and_acked_on_the_way() -> None:
    """Past TX_FLUSH (and ACK_EVERY) of gathered data, a flow is written and ACKed before the batch ends."""
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.capacity = 1 << 24
    conn = rig.conn()
    conn.wnd_to_tap = 1 << 24
    chunk = 60000
    count = batch_mod.TX_FLUSH // chunk + 1
    for i in range(count):
        rig.guest(ACK, G_ISN + 1 + i * chunk, our, b"d" * chunk, flush=False)
    assert sock.sends == 1 and len(sock.tx) == count * chunk  # written once the gathered data passed TX_FLUSH
    assert rig.take()[-1].tcp.ack == G_ISN + 1 + count * chunk  # and ACKed at once
    rig.guest(ACK, G_ISN + 1 + count * chunk, our, b"e" * chunk, flush=False)
    assert sock.sends == 1  # the rest waits for the end of the batch
    rig.handler.flush(0.0)
    assert sock.sends == 2 and len(sock.tx) == (count + 1) * chunk


def test_a_batch_of_guest_segments_is_one_write_and_a_short_write_falls_back() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    for i in range(5):
        rig.guest(ACK, G_ISN + 1 + i * 1000, our, bytes([i]) * 1000, flush=False)
    assert sock.sends == 0 and bytes(sock.tx) == b""  # gathered until the end of the batch
    rig.handler.flush(0.0)
    assert sock.sends == 1 and bytes(sock.tx) == b"".join(bytes([i]) * 1000 for i in range(5))
    assert rig.take()[-1].tcp.ack == G_ISN + 5001
    # The socket takes only part of the next batch: the ACK covers what it took, the rest comes again.
    sock.capacity = 1500
    for i in range(3):
        rig.guest(ACK, G_ISN + 5001 + i * 1000, our, b"n" * 1000, flush=False)
    rig.handler.flush(0.0)
    assert rig.take()[-1].tcp.ack == G_ISN + 6501 and rig.conn().seq_from_tap == G_ISN + 6501
    sock.capacity = 1 << 20
    rig.guest(ACK, G_ISN + 6501, our, b"n" * 1500)  # the guest's retransmission lines up
    assert len(sock.tx) == 8000 and rig.take()[-1].tcp.ack == G_ISN + 8001


def test_data_then_a_bare_fin_in_one_batch_writes_the_data_before_shutting_down() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    order: list[str] = []
    send, shutdown = sock.send, sock.shutdown_write
    sock.send = lambda chunks, more: order.append("send") or send(chunks, more)  # type: ignore[method-assign]
    sock.shutdown_write = lambda: order.append("shutdown") or shutdown()  # type: ignore[method-assign]
    rig.guest(ACK | PSH, G_ISN + 1, our, b"last words", flush=False)
    rig.guest(FIN | ACK, G_ISN + 11, our, flush=False)
    rig.handler.flush(0.0)
    assert order == ["send", "shutdown"] and bytes(sock.tx) == b"last words"
    assert rig.take()[-1].tcp.ack == G_ISN + 12


def test_a_lost_final_handshake_ack_is_repaired_by_a_syn_ack_retransmission() -> None:
    """The guest's last ACK of the handshake is lost and the server speaks first (an SSH or SMTP banner): the
    SYN-ACK is sent again with backoff, the guest's answering ACK establishes the flow, the banner flows."""
    rig = Rig()
    rig.guest(SYN, G_ISN)
    conn = rig.conn()
    sock = rig.factory.socks[-1]
    rig.handler.sock_connected(conn, 0.0)
    (synack,) = rig.take()
    sock.rx += b"SSH-2.0-banner\r\n"
    rig.handler.sock_readable(conn, 0.01)
    assert rig.take() == []  # held until the handshake completes
    for expected in (1.0, 3.0):  # the guest's ACK never arrives: RTO, then doubled
        assert rig.handler.next_deadline() == expected
        rig.handler.on_timer(expected)
        (again,) = rig.take()
        assert again.flags == SYN | ACK and again.tcp.seq == synack.tcp.seq and again.tcp.ack == G_ISN + 1
        assert again.tcp.mss == synack.tcp.mss and again.tcp.ws == synack.tcp.ws
    assert rig.stats.handled["tcp.syn_retransmit"] == 2
    rig.guest(ACK, G_ISN + 1, seq_add(synack.tcp.seq, 1), now=3.1)  # the guest answers the repeated SYN-ACK
    assert states.state_name(conn.events) == "ESTABLISHED"
    assert b"".join(s.data for s in rig.take()) == b"SSH-2.0-banner\r\n"
    assert conn.retransmits == 0 and rig.handler.half_open == 0


def test_an_unanswered_syn_ack_is_given_up_after_the_retransmissions() -> None:
    rig = Rig(timeouts=Timeouts(tcp_max_retransmits=2))
    rig.guest(SYN, G_ISN)
    sock = rig.factory.socks[-1]
    rig.handler.sock_connected(rig.conn(), 0.0)
    rig.take()
    for expected in (1.0, 3.0):
        rig.handler.on_timer(expected)
        assert rig.take()[0].flags == SYN | ACK
    rig.handler.on_timer(rig.handler.next_deadline())
    assert sock.was_reset and len(rig.flows) == 0 and rig.take()[0].flags & RST


def test_host_closes_first_the_guests_fin_is_acked_and_its_retransmission_too() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.eof = True
    conn = rig.conn()
    rig.handler.sock_readable(conn, 0.0)
    (fin,) = rig.take()
    assert fin.flags & FIN
    rig.guest(ACK, G_ISN + 1, seq_add(our, 1), now=0.1)
    rig.take()
    rig.guest(FIN | ACK, G_ISN + 1, seq_add(our, 1), now=0.2)
    (ack,) = rig.take()
    assert ack.flags == ACK and ack.tcp.ack == G_ISN + 2 and ack.tcp.seq == seq_add(our, 1)
    assert len(rig.flows) == 0 and sock.closed and not sock.was_reset
    assert rig.closed == [(conn.flow_id, "fin")]
    # That ACK was lost: the guest sends its FIN again, and is answered with the same ACK, never an RST.
    for now in (1.2, 3.2):
        rig.guest(FIN | ACK, G_ISN + 1, seq_add(our, 1), now=now)
        (again,) = rig.take()
        assert again.flags == ACK and again.tcp.ack == G_ISN + 2 and again.tcp.seq == seq_add(our, 1)
    assert rig.stats.handled["tcp.time_wait_ack"] == 2
    # Not forever: after the time-wait, a FIN for the long-gone flow is answered as any stray segment.
    rig.guest(FIN | ACK, G_ISN + 1, seq_add(our, 1), now=0.2 + base_mod.TIME_WAIT + 1)
    assert rig.take()[0].flags & RST


def test_the_guests_fin_is_acked_even_when_the_peer_has_not_acknowledged_its_data() -> None:
    """Closed in order while the host peer still has data to acknowledge: the guest's FIN is ACKed anyway
    (the socket is closed normally and delivers it), not left for the guest to retransmit into an RST."""
    rig = Rig()
    our, sock = established(rig)
    sock.acked = 0  # a remote peer that acknowledges nothing for now
    sock.eof = True
    rig.handler.sock_readable(rig.conn(), 0.0)
    rig.guest(ACK, G_ISN + 1, seq_add(our, 1), now=0.1)
    rig.take()
    rig.guest(FIN | ACK, G_ISN + 1, seq_add(our, 1), b"last", now=0.2)
    assert len(rig.flows) == 0 and bytes(sock.tx) == b"last" and not sock.was_reset
    assert rig.take()[-1].tcp.ack == G_ISN + 6


def test_syn_flood_is_capped_the_oldest_gives_way_and_old_half_open_flows_expire_early() -> None:
    rig = Rig()
    rig.handler.set_half_open_limits(cap=8, pressure=4)
    assert rig.stats.limits["tcp.half_open"] == 8 and rig.stats.limits["tcp.half_open_pressure"] == 4
    _, sock = established(rig, dst=FAR4)  # a transfer that the flood must leave alone
    rig.take()
    for i in range(20):
        rig.guest(SYN, G_ISN, sport=50000 + i, dst=FAR4, now=0.5)
    assert rig.handler.half_open == 8
    rsts = rig.take()
    assert len(rsts) == 12 and all(s.flags & RST for s in rsts)  # the 12 oldest, evicted
    assert {s.tcp.dport for s in rsts} == set(range(50000, 50012))
    assert rig.stats.dropped["tcp.half_open_evicted"] == 12
    live = [s for s in rig.factory.socks if not s.was_reset and not s.closed]
    assert len(live) == 1 + 8  # the flood never holds more than the cap, and the newest SYN got in
    # Under pressure the half-open flows go after PRESSURE_SYN_TIMEOUT, not after tcp_syn (240 s).
    deadline = rig.handler.next_deadline()
    assert deadline <= 0.5 + base_mod.PRESSURE_SYN_TIMEOUT
    established_conn = rig.flows.by_id(1)
    rig.handler.on_timer(0.5 + base_mod.PRESSURE_SYN_TIMEOUT)
    assert rig.handler.half_open < 4
    assert rig.stats.handled["tcp.half_open_expired"] >= 5
    assert all(s.flags & RST for s in rig.take())  # each given-up flow is reset toward the guest
    # New SYNs are taken again, and the established flow was untouched.
    rig.guest(SYN, G_ISN, sport=60000, dst=FAR4, now=11.0)
    assert rig.take() == [] and rig.handler.half_open < 5
    assert isinstance(established_conn, TcpConn) and established_conn.sock is sock and not sock.closed
    sock.rx += b"data"
    rig.handler.sock_readable(established_conn, 11.0)
    assert b"".join(s.data for s in rig.take()) == b"data"


def test_a_full_flow_table_refuses_a_syn_with_rst_and_counts_it() -> None:
    rig = Rig()
    rig.flows.max_flows = 1
    established(rig)
    rig.take()
    rig.guest(SYN, G_ISN, sport=50001)
    (rst,) = rig.take()
    assert rst.flags & RST and rig.stats.dropped["flow.table_full"] == 1 and len(rig.flows) == 1
