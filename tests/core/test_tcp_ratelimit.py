"""Rate limits in the TCP core, with fake sockets and literal times (the live test is
tests/netns/test_ratelimit.py): the window and the data toward the guest stay within the tokens, a timer
resumes the flow, nothing is dropped, and an unlimited handler never touches a bucket."""

from __future__ import annotations

from passtd.dataplane.core.ratelimit import RateSpec
from passtd.dataplane.core.tcp.seq import seq_add
from tests.core.test_tcp_core import G_ISN, established
from tests.helpers.tcpfake import FakeSock, Rig

RATE = 8_000_000  # 1 000 000 bytes/s
BURST = 20_000  # quantum 5 000


def limited(egress: bool) -> tuple[Rig, int, FakeSock]:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    spec = RateSpec(RATE, BURST)
    rig.handler.shaper.configure(spec if egress else None, None if egress else spec, 0.0)
    return rig, our, sock


def test_egress_window_follows_the_tokens_and_reopens_on_the_timer() -> None:
    rig, our, sock = limited(egress=True)
    conn = rig.conn()
    rig.guest(0x10 | 0x08, G_ISN + 1, our, b"x" * 15_000, now=0.0)
    ack = rig.take()[-1]
    assert bytes(sock.tx) == b"x" * 15_000  # accepted whole: shaping never drops
    assert ack.tcp.window << conn.ws_to_tap <= 5_000  # 20 000 - 15 000 tokens left
    rig.guest(0x10 | 0x08, seq_add(G_ISN + 1, 15_000), our, b"y" * 5_000, now=0.0)
    ack = rig.take()[-1]
    assert ack.tcp.window == 0  # the bucket is empty
    assert conn.ack_due == 0.005  # a quantum (5 000 bytes) is back after 5 ms
    rig.handler.on_timer(0.005)
    (update,) = rig.take()
    assert (update.tcp.window << conn.ws_to_tap) >= 1460  # at least a segment again
    assert rig.handler.shaper.counters["egress.bytes"] == 20_000
    assert rig.handler.shaper.counters["tcp.egress.held"] >= 1


def test_ingress_sends_within_the_tokens_and_resumes_on_the_timer() -> None:
    rig, our, sock = limited(egress=False)
    conn = rig.conn()
    sock.rx += b"z" * 100_000
    rig.handler.sock_readable(conn, 0.0)
    sent = sum(len(s.data) for s in rig.take())
    assert sent <= BURST  # not the whole window: the tokens
    rig.guest(0x10, G_ISN + 1, seq_add(our, sent), now=0.001)  # the guest ACKs all of it
    assert rig.take() == []  # nothing more until a quantum is back
    due = rig.handler.next_deadline()
    assert 0.001 < due <= 0.0051
    rig.handler.on_timer(due)
    more = sum(len(s.data) for s in rig.take())
    assert 5_000 <= more <= 5_100
    assert sock.discarded == sent  # left in the socket until acknowledged: nothing lost
    assert rig.handler.shaper.counters["ingress.bytes"] == sent + more


def test_clearing_the_limit_wakes_a_held_flow_at_once() -> None:
    rig, our, sock = limited(egress=False)
    conn = rig.conn()
    sock.rx += b"z" * 100_000
    rig.handler.sock_readable(conn, 0.0)
    first = sum(len(s.data) for s in rig.take())
    rig.guest(0x10, G_ISN + 1, seq_add(our, first), now=0.0)
    assert rig.take() == []
    rig.handler.shaper.configure(None, None, 0.0)
    rig.handler.rate_changed(0.0)
    assert sum(len(s.data) for s in rig.take()) > 50_000  # the guest's window, not the tokens, limits now


def test_unlimited_flows_use_no_bucket() -> None:
    rig = Rig()
    our, sock = established(rig)
    rig.take()
    sock.rx += b"z" * 100_000
    rig.handler.sock_readable(rig.conn(), 0.0)
    rig.guest(0x10 | 0x08, G_ISN + 1, our, b"x" * 15_000, now=0.0)
    assert not rig.handler.shaper.counters
