"""TCP translation for all flows: segments from the guest, socket readiness, timers, control.

The handler owns no file descriptor. It reaches host sockets through `SockPort` objects that the shell's
`SocketFactory` creates, sends frames for the guest through `to_tap`, and reports deadlines through a heap
that the shell turns into one `call_at`. See states.py for the rules; base.py for how the concerns are split.

Every public method is one event from the shell. Flows closed while handling it are reaped at its end (for a
tap batch: in `emit_acks`, which ends every batch), never in the middle of the data path.
"""

from __future__ import annotations

import heapq
from typing import Final

from passtd.dataplane.core.flowtable import PROTO_TCP, key_addr
from passtd.dataplane.core.tcp import states as st
from passtd.dataplane.core.tcp.base import COMPLETE, TcpEnv, TcpHooks
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.tcp.handshake import TcpHandshake
from passtd.dataplane.core.tcp.rto import backoff
from passtd.dataplane.core.tcp.seq import MASK, seq_add
from passtd.dataplane.core.tcp.timers import expired
from passtd.dataplane.packets.ethernet import ETH_P_IP, ETH_P_IPV6
from passtd.dataplane.packets.tcp import ACK, RST, SYN, TcpHeader

__all__ = ["TcpEnv", "TcpHandler", "TcpHooks"]

_NEVER: Final = float("inf")


class TcpHandler(TcpHandshake):
    # ------------------------------------------------------------------------------------ guest segments

    def tap_segment(self, v6: bool, src: bytes, dst: bytes, tcp: TcpHeader, now: float) -> None:
        """One TCP segment from the guest (src = guest address, dst = the address it talks to)."""
        self._now = now
        key = (PROTO_TCP, key_addr(dst), tcp.dport, tcp.sport)
        conn = self.flows.get(key)
        if isinstance(conn, TcpConn) and conn.closing:
            self._reap_now(conn)  # closed earlier in this batch: what follows is for no flow
            conn = None
        if not isinstance(conn, TcpConn) or conn.guest_addr != src:
            if self._time_wait and self._time_wait_answer(key, src, tcp, now):
                return
            if tcp.flags & (SYN | ACK | RST) == SYN:
                self._tap_syn(v6, src, dst, tcp, key, now)
            else:
                self.stats.drop("tcp.no_flow")
                self._rst_unknown(v6, src, dst, tcp)
            return
        conn.last_tap = now
        conn.last_active = now
        conn.packets_from_guest += 1
        flags = tcp.flags
        if flags & RST:
            self._close(conn, "rst_from_guest", reset_sock=True, rst_tap=False)
            return
        ev = conn.events
        if ev & st.EV_ACCEPTED:
            self._tap_syn_ack(conn, tcp, now)
            return
        if flags & SYN:
            if ev & st.EV_SYN_ACK_SENT and tcp.seq == conn.seq_init_from_tap:
                self._send_syn(conn, ACK)  # our SYN-ACK was lost: send it again
            return  # a SYN inside a connection is otherwise ignored (RFC 5961 would challenge-ACK)
        if ev & st.EV_GUEST_SYN:
            return  # still connecting; the guest will retransmit
        if not flags & ACK:
            self.stats.drop("tcp.no_ack")
            return
        if ev & st.EV_SYN_ACK_SENT:
            if tcp.ack != seq_add(conn.seq_init_to_tap, 1):
                self._close(conn, "bad_handshake", reset_sock=True, rst_tap=True)
                return
            conn.seq_ack_from_tap = tcp.ack
            conn.rto_due = 0.0
            conn.retransmits = 0
            self._set(conn, st.EV_ESTABLISHED)
            self._on_established(conn, now)
        self._tap_ack(conn, tcp, now)
        self._tap_data(conn, tcp, now)
        self._schedule(conn)

    # --------------------------------------------------------------------------------------------- timers

    def next_deadline(self) -> float:
        """The earliest deadline of a live flow: entries of closed flows are dropped here rather than woken
        for (every short connection leaves one behind)."""
        heap = self._heap
        flows = self.flows  # `flows.by_id(...)` is a direct native call; a bound method kept aside is not
        while heap and flows.by_id(heap[0][1]) is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else _NEVER

    def reschedule_all(self) -> None:
        """After the timeouts changed: rebuild the heap from every flow's real deadline."""
        self._heap = []
        for flow in self.flows:
            if isinstance(flow, TcpConn):
                flow.scheduled = 0.0
                self._schedule(flow)

    def on_timer(self, now: float) -> None:
        self._now = now
        if len(self._half_open) >= self.half_open_pressure:
            self._expire_half_open(now)
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, flow_id = heapq.heappop(heap)
            conn = self.flows.by_id(flow_id)
            if not isinstance(conn, TcpConn) or conn.closing:
                continue
            conn.scheduled = 0.0
            self._timer(conn, now)
            self._schedule(conn)
        self.flush(now)

    def _timer(self, conn: TcpConn, now: float) -> None:
        t = self.timeouts
        if expired(conn, t, self._syn_timeout(conn), now):
            self._close(conn, "timeout", reset_sock=True, rst_tap=True)
            return
        if conn.ack_due and now >= conn.ack_due:
            conn.ack_due = 0.0
            self._update_ack(conn, now, force=False)
        if conn.persist_due and now >= conn.persist_due and not conn.closing:
            conn.persist_due = 0.0
            if conn.wnd_from_tap == 0 and conn.seg is not None:
                # Zero-window probe: an old sequence number makes the guest answer with its window.
                packet = conn.seg.build((conn.seq_to_tap - 1) & MASK, conn.seq_ack_to_tap, ACK,
                                        min(conn.wnd_to_tap >> conn.ws_to_tap, 0xFFFF))  # fmt: skip
                self.to_tap(ETH_P_IPV6 if conn.v6 else ETH_P_IP, packet, 0 if self.offload else COMPLETE, b"")
                conn.persist_due = now + backoff(conn.rto, t.tcp_rto_max)
            else:
                self._push(conn, now)
        if conn.rto_due and now >= conn.rto_due and not conn.closing:
            self._retransmit_timeout(conn, now)

    def _retransmit_timeout(self, conn: TcpConn, now: float) -> None:
        """RFC 6298 §5.4-5.6: back off, go back to the first unacknowledged byte, send again. In a handshake
        that is our SYN (host-initiated) or SYN-ACK (guest-initiated): a lost final ACK of the guest then
        costs one RTO rather than the handshake timeout."""
        t = self.timeouts
        conn.rto_due = 0.0
        ev = conn.events
        syn = bool(ev & (st.EV_ACCEPTED | st.EV_SYN_ACK_SENT))
        if not syn and not conn.in_flight:
            return
        if conn.retransmits >= t.tcp_max_retransmits:
            self._close(conn, "timeout", reset_sock=True, rst_tap=True)
            return
        conn.retransmits += 1
        conn.rto = backoff(conn.rto, t.tcp_rto_max)
        if syn:
            self._send_syn(conn, ACK if ev & st.EV_SYN_ACK_SENT else 0)
            self.stats.handled["tcp.syn_retransmit"] += 1
        else:
            conn.cwnd = conn.mss_to_tap  # RFC 5681 §3.1: after a timeout, one segment, then slow start
            conn.recover = conn.seq_max_to_tap
            self._rewind(conn, now)
        conn.rto_due = now + conn.rto

    # -------------------------------------------------------------------------------------------- control

    def rate_changed(self, now: float) -> None:
        """The rate limits changed: every established flow gets its window and its data toward the guest
        recomputed now (a flow held for tokens would otherwise wait for its timer under the old rate)."""
        self._now = now
        for flow in self.flows:
            if isinstance(flow, TcpConn) and flow.events & st.EV_ESTABLISHED and not flow.closing:
                self._queue_ack(flow)
                flow.persist_due = 0.0
                self._push(flow, now)
                self._schedule(flow)
        if self._closing:
            self._reap()

    def reset(self, conn: TcpConn, reason: str) -> None:
        """Control API / shutdown: RST both sides, and free the flow at once."""
        self._close(conn, reason, reset_sock=True, rst_tap=True)
        self._reap()
