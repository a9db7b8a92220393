"""The established data path: the guest's ACKs, its data (gathered for batch.py), data toward the guest from
the socket (peeked, discarded only once the guest acknowledged it), fast retransmission and the RTT sample."""

from __future__ import annotations

from typing import Final

from passtd.dataplane.core.tcp import states as st
from passtd.dataplane.core.tcp.batch import ACK_EVERY, TX_FLUSH, TcpBatch
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.tcp.rto import rtt_sample
from passtd.dataplane.core.tcp.seq import seq_add, seq_diff, seq_le, seq_lt
from passtd.dataplane.packets.tcp import ACK, FIN, PSH, TcpHeader

PEEK_CHUNK: Final = 1 << 20  # bytes peeked per call; the loop continues while the window allows
DUP_ACK_THRESHOLD: Final = 2  # as passt: two duplicate ACKs rewind
GSO_MAX_PAYLOAD: Final = 65536 - 14 - 60 - 64  # one super-segment stays under the kernel's 64 KiB GSO limit


class TcpData(TcpBatch):
    # -------------------------------------------------------------------------------- ACKs from the guest

    def _tap_ack(self, conn: TcpConn, tcp: TcpHeader, now: float) -> None:
        """Discard what the guest acknowledged from the socket; detect duplicate ACKs; track its window."""
        wnd = tcp.window << conn.ws_from_tap
        ack = tcp.ack
        acked = seq_diff(ack, conn.seq_ack_from_tap)
        if acked > 0 and seq_le(ack, conn.seq_max_to_tap):
            data_end = ack
            if conn.events & st.EV_HOST_FIN_SENT and ack == seq_add(conn.fin_seq, 1):
                data_end = conn.fin_seq  # the FIN is not a byte in the socket
                self._set(conn, st.EV_GUEST_ACKED_FIN)
            data = seq_diff(data_end, conn.seq_ack_from_tap)
            if data > 0 and conn.sock is not None:
                try:
                    conn.sock.discard(data)
                except OSError as exc:
                    self._sock_failed(conn, exc)
                    return
            self._rtt_sample(conn, ack, now)
            if conn.cwnd:  # slow start after a loss, until the window is the only limit again (RFC 5681 §3.1)
                conn.cwnd += data
                if conn.cwnd >= conn.wnd_from_tap:
                    conn.cwnd = 0
            conn.seq_ack_from_tap = ack
            if seq_lt(conn.seq_to_tap, ack):
                conn.seq_to_tap = ack
            if seq_lt(conn.recover, ack):
                conn.recover = ack  # kept near: compared modulo 2**32, a stale value would flip after 2 GiB
            conn.dup_acks = 0
            conn.retransmits = 0
            conn.rto_due = now + conn.rto if conn.in_flight else 0.0
            conn.wnd_from_tap = wnd
            if st.is_closed(conn.events):
                self._close(conn, "fin", reset_sock=False, rst_tap=False)
                return
            self._push(conn, now)
            return
        grew = wnd > conn.wnd_from_tap
        same_window = wnd == conn.wnd_from_tap
        conn.wnd_from_tap = wnd
        # RFC 5681 §2: a duplicate ACK carries no data, no FIN, the same window, while data is outstanding.
        # One rewind per window: more duplicates for data sent before it are echoes of the same loss.
        if (
            acked == 0
            and conn.in_flight
            and not len(tcp.payload)
            and not tcp.flags & FIN
            and same_window
            and tcp.seq == conn.seq_from_tap  # not a probe or keepalive (an old sequence number)
        ):
            conn.dup_acks += 1
            if conn.dup_acks >= DUP_ACK_THRESHOLD and not seq_lt(conn.seq_ack_from_tap, conn.recover):
                conn.dup_acks = 0
                conn.recover = conn.seq_max_to_tap
                conn.cwnd = max(conn.in_flight // 2, 2 * conn.mss_to_tap)
                self._rewind(conn, now)
                return
        if grew or (wnd and conn.persist_due):
            conn.persist_due = 0.0
            self._push(conn, now)

    def _rtt_sample(self, conn: TcpConn, ack: int, now: float) -> None:
        """One timed segment at a time, never a retransmitted one (Karn): rto.py does the arithmetic."""
        if conn.rtt_seq < 0 or seq_lt(ack, conn.rtt_seq):
            return
        conn.rtt_seq = -1
        t = self.timeouts
        conn.srtt, conn.rttvar, conn.rto = rtt_sample(conn.srtt, conn.rttvar, now - conn.rtt_sent,
                                                      t.tcp_rto_min, t.tcp_rto_max)  # fmt: skip

    def _rewind(self, conn: TcpConn, now: float) -> None:
        """Go back to the first unacknowledged byte and send again: the socket still holds it."""
        if conn.events & st.EV_GUEST_ACKED_FIN or conn.closing:
            return
        conn.seq_to_tap = conn.seq_ack_from_tap
        conn.rtt_seq = -1
        conn.total_retransmits += 1
        self.stats.handled["tcp.retransmit"] += 1
        self._push(conn, now)

    # ------------------------------------------------------------------------------ data from the guest

    def _tap_data(self, conn: TcpConn, tcp: TcpHeader, now: float) -> None:
        payload = tcp.payload
        flags = tcp.flags
        if conn.closing:
            return
        if not payload and not flags & FIN:
            if seq_lt(tcp.seq, conn.seq_from_tap):
                # A zero-window probe or a keepalive (an old sequence number, no data): answer with our ACK
                # and window (RFC 9293 §3.10.7.4). If the ACK that reopened our window was lost, the guest's
                # persist timer is its only way to learn of it: left unanswered, both sides wait forever.
                self._queue_ack(conn)
            return
        if conn.events & st.EV_GUEST_FIN:
            self._queue_ack(conn)  # retransmitted FIN or data after it: re-ACK
            return
        offset = seq_diff(conn.seq_from_tap, tcp.seq)
        if offset < 0:
            self.stats.drop("tcp.out_of_order")
            self._send(conn, ACK)  # duplicate ACK: the guest retransmits from the gap
            return
        length = len(payload)
        if offset > length or (offset == length and not flags & FIN):
            self._queue_ack(conn)  # all old: our ACK was lost
            return
        conn.bytes_from_guest += length - offset
        if offset < length:
            # Gathered, and written once per batch (see `_write`); seq_from_tap runs ahead meanwhile, so the
            # next segment of the batch lines up, and falls back if the socket takes less.
            chunk = payload[offset:]
            conn.tx.append(chunk)
            conn.tx_len += len(chunk)
            conn.tx_more = not flags & PSH
            conn.seq_from_tap = seq_add(conn.seq_from_tap, len(chunk))
            self._tx[conn.flow_id] = conn
            if conn.tx_len >= TX_FLUSH or flags & FIN:
                if not self._write(conn):
                    return  # the rest is not acknowledged; the guest sends it again
                if seq_diff(conn.seq_from_tap, conn.seq_ack_to_tap) >= ACK_EVERY:
                    self._update_ack(conn, now, force=False)  # keep a long batch going
        if flags & FIN:
            if conn.tx_len and not self._write(conn):  # earlier data of the batch goes before the FIN
                return
            self._set(conn, st.EV_GUEST_FIN)
            assert conn.sock is not None
            try:
                conn.sock.shutdown_write()
            except OSError as exc:
                self._sock_failed(conn, exc)
                return
            self._set(conn, st.EV_GUEST_FIN_SENT)
            conn.batch_data += 1  # the peer's own FIN may follow at once
            conn.seq_from_tap = seq_add(conn.seq_from_tap, 1)
            if not conn.fin_since:
                conn.fin_since = now
            if st.is_closed(conn.events):
                self._close(conn, "fin", reset_sock=False, rst_tap=False)  # its reap ACKs the FIN
                return
        self._queue_ack(conn)

    # ------------------------------------------------------------------------------ data toward the guest

    def sock_writable(self, conn: TcpConn, now: float) -> None:
        """The socket's send buffer drained: tell the guest its window reopened."""
        self._now = now
        if conn.events & st.EV_ESTABLISHED:
            self._update_ack(conn, now, force=False)
        if self._closing:
            self._reap()

    def sock_readable(self, conn: TcpConn, now: float, eof: bool = False) -> None:
        """New data, or with `eof` the peer's FIN (EPOLLRDHUP), is in the socket."""
        self._now = now
        conn.last_sock = now
        conn.last_active = now
        conn.drained = False
        if eof:
            conn.sock_eof = True
        if conn.events & st.EV_ESTABLISHED:
            self._push(conn, now)
            self._schedule(conn)
        if self._closing:
            self._reap()

    def _push(self, conn: TcpConn, now: float) -> None:
        """Send what the socket holds beyond what is in flight, inside the guest's window, MSS by MSS."""
        ev = conn.events
        if not ev & st.EV_ESTABLISHED or conn.closing:
            return
        if ev & st.EV_HOST_FIN_SENT and conn.seq_to_tap == seq_add(conn.fin_seq, 1):
            return  # everything, FIN included, is in flight
        if conn.drained and conn.seq_to_tap == conn.seq_max_to_tap:
            return  # the socket held nothing beyond what was sent, and no new data was signalled since
        sock = conn.sock
        assert sock is not None
        mss = conn.mss_to_tap
        if self.offload and mss < GSO_MAX_PAYLOAD:
            mss = GSO_MAX_PAYLOAD // mss * mss  # super-segments the kernel cuts at the guest's MSS
        sent_any = False
        ingress = self.shaper.ingress
        while True:
            if self.congested():
                self._blocked[conn.flow_id] = conn  # resumed by `unblock` once the tap has drained
                break
            in_flight = conn.in_flight
            room = conn.wnd_from_tap - in_flight
            if conn.cwnd:
                room = min(room, conn.cwnd - in_flight)
            if room <= 0:
                if conn.wnd_from_tap == 0 and not conn.persist_due:
                    conn.persist_due = now + conn.rto
                break
            if ingress is not None:
                # Rate limit: send no more than the tokens allow; the rest stays in the host socket (its
                # window slows the peer) until the flow's timer finds a quantum back.
                tokens = ingress.available(now)
                if tokens < room:
                    need = room if room < ingress.quantum else ingress.quantum
                    if tokens < need:
                        wait = ingress.reopen(need, now)
                        if not conn.persist_due or now + wait < conn.persist_due:
                            conn.persist_due = now + wait
                        self.shaper.held("tcp.ingress", wait)
                        break
                    room = tokens
            want = room if room < PEEK_CHUNK else PEEK_CHUNK
            try:
                view = sock.peek(in_flight, want)
            except OSError as exc:
                self._sock_failed(conn, exc)
                return
            if view is None:
                conn.drained = conn.seq_to_tap == conn.seq_max_to_tap
                break
            n = len(view)
            if n == 0:
                self._set(conn, st.EV_HOST_FIN)
                if not conn.fin_since:
                    conn.fin_since = now
                conn.fin_seq = conn.seq_to_tap
                self._send(conn, FIN | ACK)
                self._set(conn, st.EV_HOST_FIN_SENT)
                conn.seq_to_tap = seq_add(conn.seq_to_tap, 1)
                self._mark_sent(conn, now)
                sent_any = True
                break
            for off in range(0, n, mss):
                chunk = view[off : off + mss]
                last = off + mss >= n
                self._send(conn, ACK | PSH if last else ACK, chunk)
                conn.seq_to_tap = seq_add(conn.seq_to_tap, len(chunk))
            self._mark_sent(conn, now)
            sent_any = True
            if ingress is not None:
                ingress.charge(n, now)
                self.shaper.counters["ingress.bytes"] += n
            if n < want:
                if conn.sock_eof:
                    continue  # the peer's FIN came with this data and is not signalled again: peek for it
                # All it had; readiness is edge-triggered, so new data is signalled again.
                conn.drained = conn.seq_to_tap == conn.seq_max_to_tap
                break
        if sent_any and not conn.rto_due:
            conn.rto_due = now + conn.rto

    def has_blocked(self) -> bool:
        return bool(self._blocked)

    def unblock(self, now: float) -> None:
        """The tap drained: resume the flows that stopped sending because it was full."""
        self._now = now
        blocked, self._blocked = self._blocked, {}
        for conn in blocked.values():
            self._push(conn, now)
            self._schedule(conn)
        if self._closing:
            self._reap()

    def _mark_sent(self, conn: TcpConn, now: float) -> None:
        if seq_lt(conn.seq_max_to_tap, conn.seq_to_tap):
            if conn.rtt_seq < 0:
                conn.rtt_seq = conn.seq_to_tap
                conn.rtt_sent = now
            conn.seq_max_to_tap = conn.seq_to_tap
