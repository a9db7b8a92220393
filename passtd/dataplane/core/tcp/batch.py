"""Batching toward the host socket and back: the guest's data of one tap batch is written in one call per
flow, and each flow's ACK to the guest is brought up to date once per batch (window.py says what it is)."""

from __future__ import annotations

from typing import Final

from passtd.dataplane.core.ratelimit import egress_window
from passtd.dataplane.core.tcp import states as st
from passtd.dataplane.core.tcp.base import TcpBase
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.tcp.seq import seq_add
from passtd.dataplane.core.tcp.window import ack_window, socket_room

# Guest data of one flow gathered in a tap batch is written at this size without waiting for the batch's end,
# and then ACKed if this much is unacknowledged. 4 MiB is more than a batch (64 frames of 64 KiB) carries, so
# in practice one write and one ACK per batch, as passt does: at 1 MiB a batch took 1.4 writes and 1.5 ACK
# frames, and ns→host at MTU 65520 was 9 % slower (12.7 against 13.8 Gbit/s, pinned).
ACK_EVERY: Final = 1 << 22
TX_FLUSH: Final = 1 << 22
ANSWER_HINT: Final = 4096  # guest data per batch up to which an answer may already be waiting (a request)


class TcpBatch(TcpBase):
    def _queue_ack(self, conn: TcpConn) -> None:
        self._ack_pending[conn.flow_id] = conn

    def _write(self, conn: TcpConn) -> bool:
        """Write the guest data gathered for `conn` in one call: one wake-up of the reader per batch, not
        one per frame. False if the flow failed or the socket took less (seq_from_tap then falls back to
        what was written; the guest retransmits the rest)."""
        chunks, total = conn.tx, conn.tx_len
        conn.tx, conn.tx_len = [], 0
        self._tx.pop(conn.flow_id, None)
        sock = conn.sock
        if conn.closing or sock is None:
            return False
        if not total:
            return True
        try:
            n = sock.send(chunks, more=conn.tx_more)
        except OSError as exc:
            self._sock_failed(conn, exc)
            return False
        conn.written += n
        conn.batch_data += n
        egress = self.shaper.egress
        if egress is not None:
            egress.charge(n, self._now)  # inside the window we offered: see _update_ack
            self.shaper.counters["egress.bytes"] += n
        if n < total:
            conn.seq_from_tap = seq_add(conn.seq_from_tap, n - total)
            self.stats.handled["tcp.sock_full"] += 1
            self._queue_ack(conn)
            return False
        return True

    def flush_tx(self) -> None:
        """Write every flow's gathered guest data. The chunks view the tap's read buffers: this must run
        before the next read from the tap (the dataplane calls it at the end of every tap batch)."""
        tx, self._tx = self._tx, {}
        for conn in tx.values():
            self._write(conn)

    def flush(self, now: float) -> None:
        """End of a batch: ACK the guest's data as far as the host peer has acknowledged it."""
        self.prepare_acks(now)
        self.emit_acks()

    def prepare_acks(self, now: float) -> bool:
        """First half of `flush`: ACK numbers and windows are brought up to date, but the pure ACKs are held
        until `emit_acks`, so a data segment sent in between (an answer already waiting in the socket)
        carries the ACK instead. Returns whether an answer is worth looking for: some flow got a small
        request (or a FIN) in this batch. Bulk data is not answered, and polling for it costs throughput."""
        self._now = now
        if self._tx:
            self.flush_tx()
        pending, self._ack_pending = self._ack_pending, {}
        answer = False
        for conn in pending.values():
            if 0 < conn.batch_data <= ANSWER_HINT:
                answer = True
            conn.batch_data = 0
            self._update_ack(conn, now, force=True, hold=True)
        return answer

    def emit_acks(self) -> None:
        """Second half of `flush`: the pure ACKs still owed (no data segment took them along); then the end
        of the batch, where the flows closed during it are reaped."""
        if self._acks_owed:
            owed, self._acks_owed = self._acks_owed, {}
            for conn in owed.values():
                if conn.closing:
                    self._acks_owed[conn.flow_id] = conn  # its reap sends it (in order) or drops it (reset)
                else:
                    self._send_ack(conn, conn.seq_ack_to_tap)
        if self._closing:
            self._reap()

    def _update_ack(self, conn: TcpConn, now: float, force: bool, hold: bool = False) -> None:
        sock = conn.sock
        if sock is None or conn.closing:
            return
        written = conn.written
        if (
            conn.local
            and conn.info_written >= 0
            and (conn.info_free - (written - conn.info_written) >= conn.info_sndbuf * 3 // 8)
        ):
            # A local peer: everything written counts as acknowledged, and while at least half of the
            # room measured last time is left, the window is estimated from it (conservatively: what the
            # peer read since only adds room) instead of reading TCP_INFO and SO_SNDBUF again.
            acked = written
            free = conn.info_free - (written - conn.info_written)
            queued = -1
            sndbuf = conn.info_sndbuf
        else:
            try:
                info = sock.info()
            except OSError as exc:
                self._sock_failed(conn, exc)
                return
            sndbuf = info.sndbuf
            acked, free, queued = socket_room(written, info.bytes_acked, sndbuf, conn.local)
            conn.info_free, conn.info_written, conn.info_sndbuf = free, written, sndbuf
        reopen = 0.0
        egress = self.shaper.egress
        if egress is not None:
            # Rate limit: the window reaches no further than the tokens left; when that closes it (or
            # nearly), the ACK timer reopens it once a quantum is back. Nothing the guest sent is dropped.
            tokens = egress.available(now)
            if tokens < free:
                # one granule of our window scale over the MSS: the field rounds down, and a window one byte
                # short of a segment stalls the guest until its persist timer (200 ms)
                segment = conn.mss_to_tap + (1 << conn.ws_to_tap)
                free, reopen = egress_window(egress, tokens, free, segment, now)
                if reopen:
                    self.shaper.held("tcp.egress", reopen)
        ack, wnd = ack_window(conn.seq_init_from_tap, conn.seq_from_tap, written, acked, free,
                              bool(conn.events & st.EV_GUEST_FIN_SENT), conn.ws_to_tap > 0)  # fmt: skip
        changed = ack != conn.seq_ack_to_tap or wnd != conn.wnd_to_tap
        conn.wnd_to_tap = wnd
        if changed or force:
            conn.seq_ack_to_tap = ack
            if hold:
                self._acks_owed[conn.flow_id] = conn
            else:
                self._send_ack(conn, ack)
        if queued >= 0:
            # Re-check on the ACK interval while the socket holds data the peer has not acknowledged: its
            # free space and the peer's ACK both change without telling us. When the buffer, not the peer,
            # limits the window, the socket's writability says at once when it reopens.
            pending = ack != conn.seq_from_tap or queued > 0
            self.sockets.want_write(conn, free < sndbuf // 4 and not conn.events & st.EV_GUEST_FIN)
            conn.ack_due = now + self.timeouts.tcp_ack_interval if pending else 0.0
        else:
            conn.ack_due = now + self.timeouts.tcp_ack_interval if ack != conn.seq_from_tap else 0.0
        if reopen and (not conn.ack_due or now + reopen < conn.ack_due):
            conn.ack_due = now + reopen
        self._set_clamp(conn)
        if st.is_closed(conn.events):
            self._close(conn, "fin", reset_sock=False, rst_tap=False)
            return
        self._schedule(conn)

    def _set_clamp(self, conn: TcpConn) -> None:
        """Mirror the guest's window onto the socket (TCP_WINDOW_CLAMP), with hysteresis to save syscalls."""
        want = max(conn.wnd_from_tap, conn.mss_to_tap)
        if conn.clamp < 0 or abs(want - conn.clamp) * 4 > conn.clamp:
            assert conn.sock is not None
            try:
                conn.sock.set_window_clamp(want)
                conn.clamp = want
            except OSError:
                pass
