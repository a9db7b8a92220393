"""TCP translation for all flows: segments from the guest, socket readiness, timers.

The handler owns no file descriptor. It reaches host sockets through `SockPort` objects that the shell's
`SocketFactory` creates, appends frames for the guest to `out`, and reports deadlines through a heap that the
shell turns into one `call_at`. See states.py for the rules; this module is the data path.
"""

from __future__ import annotations

import errno
import heapq
from collections.abc import Callable, Sized
from typing import Final, Protocol

from passtd.dataplane.core.context import Context, Guest, is_loopback
from passtd.dataplane.core.flowtable import PROTO_TCP, FlowTable, FlowTableFull, key_addr
from passtd.dataplane.core.icmp import remote_as_seen
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.tcp import states as st
from passtd.dataplane.core.tcp.conn import SockPort, TcpConn
from passtd.dataplane.core.tcp.seq import MASK, isn, seq_add, seq_diff, seq_le, seq_lt
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.core.udp import target_for
from passtd.dataplane.packets.ethernet import ETH_P_IP, ETH_P_IPV6
from passtd.dataplane.packets.tcp import ACK, FIN, PSH, RST, SYN, SegmentBuilder, TcpHeader, syn_options

OUR_WS: Final = 8  # window scale we offer: windows up to 16 MiB
MAX_WINDOW: Final = (1 << 24) - 1
PEEK_CHUNK: Final = 1 << 20  # bytes peeked per call; the loop continues while the window allows
DEFAULT_MSS: Final = 536  # RFC 9293 §3.7.1, when the guest sends no MSS option
DUP_ACK_THRESHOLD: Final = 2  # as passt: two duplicate ACKs rewind
# Guest data of one flow gathered in a tap batch is written at this size without waiting for the batch's end,
# and then ACKed if this much is unacknowledged. 4 MiB is more than a batch (64 frames of 64 KiB) carries, so
# in practice one write and one ACK per batch, as passt does: at 1 MiB a batch took 1.4 writes and 1.5 ACK
# frames, and ns→host at MTU 65520 was 9 % slower (12.7 against 13.8 Gbit/s, pinned).
ACK_EVERY: Final = 1 << 22
TX_FLUSH: Final = 1 << 22
ANSWER_HINT: Final = 4096  # guest data per batch up to which an answer may already be waiting (a request)


class SocketFactory(Protocol):
    """How the handler obtains host sockets (the shell opens them; tests hand out fakes)."""

    def connect(self, conn: TcpConn) -> SockPort:
        """Start a non-blocking connect to conn.target_addr:remote_port with the guest's MSS.
        Completion comes back as `sock_connected` / `sock_error`. Raises OSError when it fails at once."""
        ...

    def forget(self, conn: TcpConn) -> None:
        """The flow is being freed and its socket is closed right after: stop dispatching its events."""
        ...

    def want_write(self, conn: TcpConn, on: bool) -> None:
        """Ask for `sock_writable` when the socket's send buffer has room again (or stop asking)."""
        ...


# (ethertype, IP packet or headers, offload, payload after the headers) → the guest. offload -1: a complete
# packet; 0: TCP checksum left to the kernel; > 0: also a super-segment for the kernel to cut at that size
# (see packets/vnet.py). The payload may view a buffer reused later: copy it if it must outlive the call.
TapOut = Callable[[int, bytes, int, bytes | memoryview], None]
COMPLETE: Final = -1
GSO_MAX_PAYLOAD: Final = 65536 - 14 - 60 - 64  # one super-segment stays under the kernel's 64 KiB GSO limit


class TcpHandler:
    def __init__(
        self,
        ctx: Context,
        guest: Guest,
        flows: FlowTable,
        stats: Stats,
        sockets: SocketFactory,
        to_tap: TapOut,
        secret: bytes,
        timeouts: Timeouts | None = None,
        on_close: Callable[[TcpConn, str], None] | None = None,
        on_state: Callable[[TcpConn, str, str], None] | None = None,
        offload: bool = False,
        congested: Callable[[], bool] | None = None,
        watching: Sized | None = None,
    ) -> None:
        self.offload = offload  # the tap segments and checksums TCP for us (pasta with IFF_VNET_HDR)
        self.congested: Callable[[], bool] = congested or (lambda: False)
        self._blocked: dict[int, TcpConn] = {}
        self.ctx = ctx
        self.guest = guest
        self.flows = flows
        self.stats = stats
        self.sockets = sockets
        self.to_tap = to_tap
        self.secret = secret
        # RFC 6528 initial sequence numbers; an attribute so that a test can start a flow just below the wrap.
        self.isn: Callable[[bytes, bytes, int, bytes, int, float], int] = isn
        self.timeouts = timeouts or Timeouts()
        self.on_close = on_close
        self.on_state = on_state
        self.watching = watching  # when given, on_state is called only while this is non-empty
        self._heap: list[tuple[float, int]] = []
        self._ack_pending: dict[int, TcpConn] = {}
        self._acks_owed: dict[int, TcpConn] = {}  # pure ACKs held by prepare_acks, see there
        self._tx: dict[int, TcpConn] = {}  # flows with guest data gathered in this batch (flush_tx)

    def _set(self, conn: TcpConn, bit: int) -> None:
        """Every event goes through states.set_event; observers hear about user-visible state changes (the
        names are only worked out while someone listens: `watching` is the shell's list of listeners)."""
        before = conn.events
        conn.events = st.set_event(before, bit)
        if self.on_state is not None and (self.watching is None or self.watching):
            name_before, after = st.state_name(before), st.state_name(conn.events)
            if after != name_before:
                self.on_state(conn, name_before, after)

    # ------------------------------------------------------------------------------------------ frames out

    def _send(
        self, conn: TcpConn, flags: int, payload: bytes | memoryview = b"", options: bytes = b""
    ) -> None:
        assert conn.seg is not None
        window = min(conn.wnd_to_tap >> conn.ws_to_tap, 0xFFFF)
        headers = conn.seg.headers(conn.seq_to_tap, conn.seq_ack_to_tap if flags & ACK else 0, flags, window,
                                   payload, options)  # fmt: skip
        conn.packets_to_guest += 1
        conn.bytes_to_guest += len(payload)
        if flags & ACK and self._acks_owed:
            self._acks_owed.pop(conn.flow_id, None)
        gso = COMPLETE
        if self.offload:
            gso = conn.mss_to_tap if len(payload) > conn.mss_to_tap else 0
        self.to_tap(ETH_P_IPV6 if conn.v6 else ETH_P_IP, headers, gso, payload)

    def _rst_unknown(self, v6: bool, src: bytes, dst: bytes, tcp: TcpHeader) -> None:
        """RFC 9293 §3.10.7.1: a segment for no connection gets an RST (never an RST for an RST)."""
        if tcp.flags & RST:
            return
        seg = SegmentBuilder(dst, src, tcp.dport, tcp.sport)
        if tcp.flags & ACK:
            packet = seg.build(tcp.ack, 0, RST, 0)
        else:
            length = len(tcp.payload) + (1 if tcp.flags & SYN else 0) + (1 if tcp.flags & FIN else 0)
            packet = seg.build(0, seq_add(tcp.seq, length), RST | ACK, 0)
        self.to_tap(ETH_P_IPV6 if v6 else ETH_P_IP, packet, COMPLETE, b"")

    # ------------------------------------------------------------------------------------ guest segments

    def tap_segment(self, v6: bool, src: bytes, dst: bytes, tcp: TcpHeader, now: float) -> None:
        """One TCP segment from the guest (src = guest address, dst = the address it talks to)."""
        key = (PROTO_TCP, key_addr(dst), tcp.dport, tcp.sport)
        conn = self.flows.get(key)
        if not isinstance(conn, TcpConn) or conn.guest_addr != src:
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
        if ev & st.SOCK_ACCEPTED:
            self._tap_syn_ack(conn, tcp, now)
            return
        if flags & SYN:
            if ev & st.TAP_SYN_ACK_SENT and tcp.seq == conn.seq_init_from_tap:
                conn.seq_to_tap = conn.seq_init_to_tap  # our SYN-ACK was lost: send it again
                self._send_syn(conn, ACK)
            return  # a SYN inside a connection is otherwise ignored (RFC 5961 would challenge-ACK)
        if ev & st.TAP_SYN_RCVD:
            return  # still connecting; the guest will retransmit
        if not flags & ACK:
            self.stats.drop("tcp.no_ack")
            return
        if ev & st.TAP_SYN_ACK_SENT:
            if tcp.ack != seq_add(conn.seq_init_to_tap, 1):
                self._close(conn, "bad_handshake", reset_sock=True, rst_tap=True)
                return
            conn.seq_ack_from_tap = tcp.ack
            self._set(conn, st.ESTABLISHED)
            self._on_established(conn, now)
        self._tap_ack(conn, tcp, now)
        if self.flows.by_id(conn.flow_id) is not conn:
            return
        self._tap_data(conn, tcp, now)
        if self.flows.by_id(conn.flow_id) is conn:
            self._schedule(conn)

    def _tap_syn(self, v6: bool, src: bytes, dst: bytes, tcp: TcpHeader, key: tuple[int, bytes, int, int],
                 now: float) -> None:  # fmt: skip
        """Guest → host: open a host socket toward the destination (mapped: core/icmp.map_target, and DNS to
        a --dns-forward address goes to the host's resolver, core/udp.target_for)."""
        ctx = self.ctx
        if (v6 and ctx.ip6 is None) or (not v6 and ctx.ip4 is None):
            self.stats.drop("tcp.family_disabled")
            self._rst_unknown(v6, src, dst, tcp)
            return
        conn = TcpConn(
            self.flows.new_id(), PROTO_TCP, key, now, now, guest_initiated=True, v6=v6,
            guest_addr=bytes(src), guest_port=tcp.sport, remote_addr=bytes(dst), remote_port=tcp.dport,
            target_addr=target_for(ctx, bytes(dst), tcp.dport, ctx.dns_forward, ctx.dns_upstream),
        )  # fmt: skip
        conn.local = is_loopback(conn.target_addr)
        conn.seg = SegmentBuilder(conn.remote_addr, conn.guest_addr, conn.remote_port, conn.guest_port,
                                  self.offload)  # fmt: skip
        conn.seq_init_from_tap = tcp.seq
        conn.seq_from_tap = seq_add(tcp.seq, 1)
        conn.seq_ack_to_tap = conn.seq_from_tap
        self._take_syn_options(conn, tcp)
        conn.seq_init_to_tap = self.isn(self.secret, conn.remote_addr, conn.remote_port, conn.guest_addr,
                                   conn.guest_port, now)  # fmt: skip
        conn.seq_to_tap = conn.seq_max_to_tap = conn.seq_ack_from_tap = conn.recover = conn.seq_init_to_tap
        conn.rto = self.timeouts.tcp_rto_initial
        conn.last_tap = conn.last_sock = now
        try:
            self.flows.add(conn)
        except FlowTableFull:
            self.stats.drop("flow.table_full")
            self._rst_unknown(v6, src, dst, tcp)
            return
        self._set(conn, st.TAP_SYN_RCVD)
        self.stats.handled["tcp.syn"] += 1
        try:
            conn.sock = self.sockets.connect(conn)
        except OSError as exc:
            self._close(conn, f"connect_failed:{exc.errno}", reset_sock=False, rst_tap=False)
            self._rst_unknown(v6, src, dst, tcp)
            return
        self._schedule(conn)

    def _take_syn_options(self, conn: TcpConn, tcp: TcpHeader) -> None:
        """RFC 7323: scaling is used in both directions only if both SYNs carry the option."""
        conn.mss_to_tap = min(tcp.mss or DEFAULT_MSS, self._mss_limit(conn.v6))
        if tcp.ws >= 0:
            conn.ws_from_tap = tcp.ws
            conn.ws_to_tap = OUR_WS
        else:
            conn.ws_from_tap = conn.ws_to_tap = 0
        conn.wnd_from_tap = tcp.window  # a SYN's window is never scaled (RFC 7323 §2.2)

    def _mss_limit(self, v6: bool) -> int:
        return self.ctx.mtu - (60 if v6 else 40)

    def _send_syn(self, conn: TcpConn, extra: int) -> None:
        ws = OUR_WS if (conn.ws_to_tap or extra == 0) else -1
        conn.wnd_to_tap = 0xFFFF if ws < 0 else min(MAX_WINDOW, 0xFFFF << OUR_WS)
        window_shift, conn.ws_to_tap = conn.ws_to_tap, 0  # the SYN's window field is unscaled
        self._send(conn, SYN | extra, options=syn_options(self._mss_limit(conn.v6), ws))
        conn.ws_to_tap = window_shift
        conn.seq_to_tap = conn.seq_max_to_tap = seq_add(conn.seq_init_to_tap, 1)

    def sock_connected(self, conn: TcpConn, now: float) -> None:
        """connect() completed: answer the guest's SYN."""
        if not conn.events & st.TAP_SYN_RCVD:
            return
        conn.last_sock = now
        self._set(conn, st.TAP_SYN_ACK_SENT)
        self._send_syn(conn, ACK)
        self._schedule(conn)

    def sock_error(self, conn: TcpConn, reason: str, now: float) -> None:
        """connect() failed or the socket broke: RST to the guest at once (refused connects included)."""
        self._close(conn, reason, reset_sock=True, rst_tap=True)

    def accepted(
        self, sock: SockPort, peer: bytes, peer_port: int, guest_port: int, now: float
    ) -> TcpConn | None:
        """Host → guest: a peer connected to a forwarded port; send a SYN to the guest.
        A peer on the host's loopback appears to come from the gateway address (unless --no-map-gw)."""
        v6 = len(peer) == 16
        mapped = v6 and peer[:12] == b"\x00" * 10 + b"\xff\xff"
        if mapped:
            peer, v6 = peer[12:], False
        net4, net6 = self.ctx.ip4, self.ctx.ip6
        if (v6 and net6 is None) or (not v6 and net4 is None):
            sock.reset()
            self.stats.drop("tcp.family_disabled")
            return None
        remote = remote_as_seen(self.ctx, peer)
        guest_addr = self._guest_address(v6)
        key = (PROTO_TCP, key_addr(remote), peer_port, guest_port)
        old = self.flows.get(key)
        if old is not None:
            if isinstance(old, TcpConn):
                self._close(old, "replaced", reset_sock=True, rst_tap=True)
            else:
                self.flows.remove(old)
        conn = TcpConn(
            self.flows.new_id(), PROTO_TCP, key, now, now, guest_initiated=False, v6=v6,
            guest_addr=guest_addr, guest_port=guest_port, remote_addr=remote, remote_port=peer_port,
            target_addr=peer, sock=sock, local=remote != peer or is_loopback(peer),
        )  # fmt: skip
        conn.seg = SegmentBuilder(remote, guest_addr, peer_port, guest_port, self.offload)
        conn.seq_init_to_tap = self.isn(self.secret, remote, peer_port, guest_addr, guest_port, now)
        conn.seq_to_tap = conn.seq_ack_from_tap = conn.recover = conn.seq_init_to_tap
        conn.ws_to_tap = OUR_WS
        conn.rto = self.timeouts.tcp_rto_initial
        conn.last_tap = conn.last_sock = now
        try:
            self.flows.add(conn)
        except FlowTableFull:
            sock.reset()
            self.stats.drop("flow.table_full")
            return None
        self._set(conn, st.SOCK_ACCEPTED)
        self._send_syn(conn, 0)
        conn.rto_due = now + conn.rto
        self._schedule(conn)
        return conn

    def _guest_address(self, v6: bool) -> bytes:
        """The address the guest last used, else the one we gave it."""
        if v6:
            assert self.ctx.ip6 is not None
            seen6 = [a for a in self.guest.addrs6 if not a.is_link_local]
            return (seen6[-1] if seen6 else self.ctx.ip6.addr).packed
        assert self.ctx.ip4 is not None
        seen4 = list(self.guest.addrs4)
        return (seen4[-1] if seen4 else self.ctx.ip4.addr).packed

    def _tap_syn_ack(self, conn: TcpConn, tcp: TcpHeader, now: float) -> None:
        """The guest answered our SYN (host-initiated flow)."""
        if tcp.flags & (SYN | ACK) != SYN | ACK or tcp.ack != seq_add(conn.seq_init_to_tap, 1):
            if tcp.flags & SYN:
                self.stats.drop("tcp.bad_syn_ack")
            return
        conn.seq_init_from_tap = tcp.seq
        conn.seq_from_tap = conn.seq_ack_to_tap = seq_add(tcp.seq, 1)
        conn.seq_ack_from_tap = tcp.ack
        self._take_syn_options(conn, tcp)
        if tcp.ws < 0:
            conn.ws_to_tap = 0
        self._set(conn, st.ESTABLISHED)
        conn.rto_due = 0.0
        conn.retransmits = 0
        self._send(conn, ACK)
        self._on_established(conn, now)
        self._schedule(conn)

    def _on_established(self, conn: TcpConn, now: float) -> None:
        self.stats.handled["tcp.established"] += 1
        assert conn.sock is not None
        if not conn.local:  # on loopback a guest-sized MSS would only make the host's own stack slower
            try:
                conn.sock.set_mss(conn.mss_to_tap)
            except OSError:
                pass
        self._push(conn, now)  # data (or EOF) may have arrived while the handshake was going on

    # -------------------------------------------------------------------------------- ACKs from the guest

    def _tap_ack(self, conn: TcpConn, tcp: TcpHeader, now: float) -> None:
        """Discard what the guest acknowledged from the socket; detect duplicate ACKs; track its window."""
        wnd = tcp.window << conn.ws_from_tap
        ack = tcp.ack
        acked = seq_diff(ack, conn.seq_ack_from_tap)
        if acked > 0 and seq_le(ack, conn.seq_max_to_tap):
            data_end = ack
            if conn.events & st.SOCK_FIN_SENT and ack == seq_add(conn.fin_seq, 1):
                data_end = conn.fin_seq  # the FIN is not a byte in the socket
                self._set(conn, st.TAP_FIN_ACKED)
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
            if is_done(conn):
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
        """RFC 6298 §2: SRTT/RTTVAR from one timed segment at a time, never a retransmitted one (Karn)."""
        if conn.rtt_seq < 0 or seq_lt(ack, conn.rtt_seq):
            return
        r = now - conn.rtt_sent
        conn.rtt_seq = -1
        if conn.srtt == 0.0:
            conn.srtt, conn.rttvar = r, r / 2
        else:
            conn.rttvar = 0.75 * conn.rttvar + 0.25 * abs(conn.srtt - r)
            conn.srtt = 0.875 * conn.srtt + 0.125 * r
        t = self.timeouts
        conn.rto = min(max(conn.srtt + max(0.001, 4 * conn.rttvar), t.tcp_rto_min), t.tcp_rto_max)

    def _rewind(self, conn: TcpConn, now: float) -> None:
        """Go back to the first unacknowledged byte and send again: the socket still holds it."""
        if conn.events & st.TAP_FIN_ACKED:
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
        if not payload and not flags & FIN:
            if seq_lt(tcp.seq, conn.seq_from_tap):
                # A zero-window probe or a keepalive (an old sequence number, no data): answer with our ACK
                # and window (RFC 9293 §3.10.7.4). If the ACK that reopened our window was lost, the guest's
                # persist timer is its only way to learn of it: left unanswered, both sides wait forever.
                self._queue_ack(conn)
            return
        if conn.events & st.TAP_FIN_RCVD:
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
            self._set(conn, st.TAP_FIN_RCVD)
            assert conn.sock is not None
            try:
                conn.sock.shutdown_write()
            except OSError as exc:
                self._sock_failed(conn, exc)
                return
            self._set(conn, st.TAP_FIN_SENT)
            conn.batch_data += 1  # the peer's own FIN may follow at once
            conn.seq_from_tap = seq_add(conn.seq_from_tap, 1)
            if not conn.fin_since:
                conn.fin_since = now
            self._queue_ack(conn)
            if is_done(conn):
                self.flush(now)
            return
        self._queue_ack(conn)

    def _queue_ack(self, conn: TcpConn) -> None:
        self._ack_pending[conn.flow_id] = conn

    def _write(self, conn: TcpConn) -> bool:
        """Write the guest data gathered for `conn` in one call: one wake-up of the reader per batch, not
        one per frame. False if the flow failed or the socket took less (seq_from_tap then falls back to
        what was written; the guest retransmits the rest)."""
        chunks, total = conn.tx, conn.tx_len
        conn.tx, conn.tx_len = [], 0
        self._tx.pop(conn.flow_id, None)
        if not total or conn.sock is None:
            return conn.sock is not None
        try:
            n = conn.sock.send(chunks, more=conn.tx_more)
        except OSError as exc:
            self._sock_failed(conn, exc)
            return False
        conn.written += n
        conn.batch_data += n
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
            if self.flows.by_id(conn.flow_id) is conn:
                self._write(conn)
            else:
                conn.tx, conn.tx_len = [], 0

    def flush(self, now: float) -> None:
        """End of a batch: ACK the guest's data as far as the host peer has acknowledged it."""
        self.prepare_acks(now)
        self.emit_acks()

    def prepare_acks(self, now: float) -> bool:
        """First half of `flush`: ACK numbers and windows are brought up to date, but the pure ACKs are held
        until `emit_acks`, so a data segment sent in between (an answer already waiting in the socket)
        carries the ACK instead. Returns whether an answer is worth looking for: some flow got a small
        request (or a FIN) in this batch. Bulk data is not answered, and polling for it costs throughput."""
        if self._tx:
            self.flush_tx()
        pending, self._ack_pending = self._ack_pending, {}
        answer = False
        for conn in pending.values():
            if self.flows.by_id(conn.flow_id) is conn:
                if 0 < conn.batch_data <= ANSWER_HINT:
                    answer = True
                conn.batch_data = 0
                self._update_ack(conn, now, force=True, hold=True)
        return answer

    def emit_acks(self) -> None:
        """Pure ACKs still owed after `prepare_acks` (no data segment took them along)."""
        if not self._acks_owed:
            return
        owed, self._acks_owed = self._acks_owed, {}
        for conn in owed.values():
            if self.flows.by_id(conn.flow_id) is conn:
                self._send_ack(conn, conn.seq_ack_to_tap)

    def _update_ack(self, conn: TcpConn, now: float, force: bool, hold: bool = False) -> None:
        sock = conn.sock
        if sock is None:
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
            peer_acked = min(info.bytes_acked, written)
            queued = written - peer_acked  # in the socket, not yet acknowledged by the peer
            # A peer on this host: what its kernel took is as good as acknowledged (no network can lose it),
            # and waiting for a local reader's delayed ACK would stall the guest for tens of ms.
            acked = written if conn.local else peer_acked
            # The window is what the socket can still take: the guest never sends beyond it, so nothing it
            # sends is dropped for want of buffer (a drop costs the guest a retransmission round). SO_SNDBUF
            # counts kernel overhead too, hence the margin.
            sndbuf = info.sndbuf
            free = max(0, sndbuf * 3 // 4 - queued)
            conn.info_free, conn.info_written, conn.info_sndbuf = free, written, sndbuf
        ack = seq_add(conn.seq_init_from_tap, 1 + acked)
        if conn.events & st.TAP_FIN_SENT and acked == written:
            ack = conn.seq_from_tap  # covers the guest's FIN
        wnd = min((written - acked) + free, MAX_WINDOW if conn.ws_to_tap else 0xFFFF)
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
            self.sockets.want_write(conn, free < sndbuf // 4 and not conn.events & st.TAP_FIN_RCVD)
            conn.ack_due = now + self.timeouts.tcp_ack_interval if pending else 0.0
        else:
            conn.ack_due = now + self.timeouts.tcp_ack_interval if ack != conn.seq_from_tap else 0.0
        self._set_clamp(conn)
        if is_done(conn):
            self._close(conn, "fin", reset_sock=False, rst_tap=False)
            return
        self._schedule(conn)

    def _send_ack(self, conn: TcpConn, ack: int) -> None:
        assert conn.seg is not None
        if self._acks_owed:
            self._acks_owed.pop(conn.flow_id, None)
        window = min(conn.wnd_to_tap >> conn.ws_to_tap, 0xFFFF)
        packet = conn.seg.build(conn.seq_to_tap, ack, ACK, window)
        conn.packets_to_guest += 1
        self.to_tap(ETH_P_IPV6 if conn.v6 else ETH_P_IP, packet, 0 if self.offload else COMPLETE, b"")

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

    # ------------------------------------------------------------------------------ data toward the guest

    def sock_writable(self, conn: TcpConn, now: float) -> None:
        """The socket's send buffer drained: tell the guest its window reopened."""
        if conn.events & st.ESTABLISHED and self.flows.by_id(conn.flow_id) is conn:
            self._update_ack(conn, now, force=False)

    def sock_readable(self, conn: TcpConn, now: float, eof: bool = False) -> None:
        """New data, or with `eof` the peer's FIN (EPOLLRDHUP), is in the socket."""
        conn.last_sock = now
        conn.last_active = now
        conn.drained = False
        if eof:
            conn.sock_eof = True
        if conn.events & st.ESTABLISHED:
            self._push(conn, now)
            self._schedule(conn)

    def _push(self, conn: TcpConn, now: float) -> None:
        """Send what the socket holds beyond what is in flight, inside the guest's window, MSS by MSS."""
        ev = conn.events
        if not ev & st.ESTABLISHED:
            return
        if ev & st.SOCK_FIN_SENT and conn.seq_to_tap == seq_add(conn.fin_seq, 1):
            return  # everything, FIN included, is in flight
        if conn.drained and conn.seq_to_tap == conn.seq_max_to_tap:
            return  # the socket held nothing beyond what was sent, and no new data was signalled since
        sock = conn.sock
        assert sock is not None
        mss = conn.mss_to_tap
        if self.offload and mss < GSO_MAX_PAYLOAD:
            mss = GSO_MAX_PAYLOAD // mss * mss  # super-segments the kernel cuts at the guest's MSS
        sent_any = False
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
                self._set(conn, st.SOCK_FIN_RCVD)
                if not conn.fin_since:
                    conn.fin_since = now
                conn.fin_seq = conn.seq_to_tap
                self._send(conn, FIN | ACK)
                self._set(conn, st.SOCK_FIN_SENT)
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
        blocked, self._blocked = self._blocked, {}
        for conn in blocked.values():
            if self.flows.by_id(conn.flow_id) is conn:
                self._push(conn, now)
                if self.flows.by_id(conn.flow_id) is conn:
                    self._schedule(conn)

    def _mark_sent(self, conn: TcpConn, now: float) -> None:
        if seq_lt(conn.seq_max_to_tap, conn.seq_to_tap):
            if conn.rtt_seq < 0:
                conn.rtt_seq = conn.seq_to_tap
                conn.rtt_sent = now
            conn.seq_max_to_tap = conn.seq_to_tap

    # --------------------------------------------------------------------------------------------- timers

    def _deadline(self, conn: TcpConn) -> float:
        t = self.timeouts
        ev = conn.events
        due = (conn.last_tap if conn.last_tap > conn.last_sock else conn.last_sock) + t.tcp_activity
        for d in (conn.rto_due, conn.ack_due, conn.persist_due):
            if d and d < due:
                due = d
        if ev & st.HANDSHAKE and conn.created + t.tcp_syn < due:
            due = conn.created + t.tcp_syn
        if ev & st.CLOSING and conn.fin_since + t.tcp_fin < due:
            due = conn.fin_since + t.tcp_fin
        return due

    def _schedule(self, conn: TcpConn) -> None:
        deadline = self._deadline(conn)
        if not conn.scheduled or deadline < conn.scheduled:
            conn.scheduled = deadline
            heapq.heappush(self._heap, (deadline, conn.flow_id))

    def next_deadline(self) -> float:
        """The earliest deadline of a live flow: entries of closed flows are dropped here rather than woken
        for (every short connection leaves one behind)."""
        heap = self._heap
        by_id = self.flows.by_id
        while heap and by_id(heap[0][1]) is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else float("inf")

    def reschedule_all(self) -> None:
        """After the timeouts changed: rebuild the heap from every flow's real deadline."""
        self._heap = []
        for flow in self.flows:
            if isinstance(flow, TcpConn):
                flow.scheduled = 0.0
                self._schedule(flow)

    def on_timer(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, flow_id = heapq.heappop(heap)
            conn = self.flows.by_id(flow_id)
            if not isinstance(conn, TcpConn):
                continue
            conn.scheduled = 0.0
            self._timer(conn, now)
            if self.flows.by_id(flow_id) is conn:
                self._schedule(conn)
        self.flush(now)

    def _timer(self, conn: TcpConn, now: float) -> None:
        t = self.timeouts
        ev = conn.events
        if st.in_handshake(ev) and now >= conn.created + t.tcp_syn:
            self._close(conn, "timeout", reset_sock=True, rst_tap=True)
            return
        if ev & st.CLOSING and now >= conn.fin_since + t.tcp_fin:
            self._close(conn, "timeout", reset_sock=True, rst_tap=True)
            return
        if now >= max(conn.last_tap, conn.last_sock) + t.tcp_activity:
            self._close(conn, "timeout", reset_sock=True, rst_tap=True)
            return
        if conn.ack_due and now >= conn.ack_due:
            conn.ack_due = 0.0
            self._update_ack(conn, now, force=False)
            if self.flows.by_id(conn.flow_id) is not conn:
                return
        if conn.persist_due and now >= conn.persist_due:
            conn.persist_due = 0.0
            if conn.wnd_from_tap == 0 and conn.seg is not None:
                # Zero-window probe: an old sequence number makes the guest answer with its window.
                packet = conn.seg.build((conn.seq_to_tap - 1) & MASK, conn.seq_ack_to_tap, ACK,
                                        min(conn.wnd_to_tap >> conn.ws_to_tap, 0xFFFF))  # fmt: skip
                self.to_tap(ETH_P_IPV6 if conn.v6 else ETH_P_IP, packet, 0 if self.offload else COMPLETE, b"")
                conn.persist_due = now + min(conn.rto * 2, t.tcp_rto_max)
            else:
                self._push(conn, now)
        if conn.rto_due and now >= conn.rto_due:
            self._retransmit_timeout(conn, now)

    def _retransmit_timeout(self, conn: TcpConn, now: float) -> None:
        """RFC 6298 §5.4-5.6: back off, go back to the first unacknowledged byte, send again."""
        t = self.timeouts
        conn.rto_due = 0.0
        if conn.events & st.SOCK_ACCEPTED:
            if conn.retransmits >= t.tcp_max_retransmits:
                self._close(conn, "timeout", reset_sock=True, rst_tap=True)
                return
            conn.retransmits += 1
            conn.rto = min(conn.rto * 2, t.tcp_rto_max)
            conn.seq_to_tap = conn.seq_init_to_tap
            self._send_syn(conn, 0)
            conn.rto_due = now + conn.rto
            return
        if not conn.in_flight:
            return
        if conn.retransmits >= t.tcp_max_retransmits:
            self._close(conn, "timeout", reset_sock=True, rst_tap=True)
            return
        conn.retransmits += 1
        conn.rto = min(conn.rto * 2, t.tcp_rto_max)
        conn.cwnd = conn.mss_to_tap  # RFC 5681 §3.1: after a timeout, one segment, then slow start
        conn.recover = conn.seq_max_to_tap
        self._rewind(conn, now)
        if self.flows.by_id(conn.flow_id) is conn:
            conn.rto_due = now + conn.rto

    # -------------------------------------------------------------------------------------------- closing

    def _sock_failed(self, conn: TcpConn, exc: OSError) -> None:
        """The host side broke: RST to the guest; a peer's RST is named as such for the control API."""
        code = exc.errno or 0
        reason = (
            "rst_from_host" if code == errno.ECONNRESET else f"host_error:{errno.errorcode.get(code, code)}"
        )
        self._close(conn, reason, reset_sock=True, rst_tap=True)

    def reset(self, conn: TcpConn, reason: str) -> None:
        """Control API / shutdown: RST both sides."""
        self._close(conn, reason, reset_sock=True, rst_tap=True)

    def _close(self, conn: TcpConn, reason: str, *, reset_sock: bool, rst_tap: bool) -> None:
        if self.flows.by_id(conn.flow_id) is not conn:
            return
        if rst_tap and conn.seg is not None and not conn.events & st.TAP_SYN_RCVD:
            self._send(conn, RST | ACK)
        elif rst_tap and conn.seg is not None:
            packet = conn.seg.build(0, conn.seq_from_tap, RST | ACK, 0)
            self.to_tap(ETH_P_IPV6 if conn.v6 else ETH_P_IP, packet, 0 if self.offload else COMPLETE, b"")
        sock = conn.sock
        if sock is not None:
            self.sockets.forget(conn)
            try:
                if reset_sock:
                    sock.reset()
                else:
                    sock.close()
            except OSError:
                pass
        conn.sock = None
        conn.close_reason = reason
        self.flows.remove(conn)
        self._ack_pending.pop(conn.flow_id, None)
        self._acks_owed.pop(conn.flow_id, None)
        self._blocked.pop(conn.flow_id, None)
        self._tx.pop(conn.flow_id, None)
        conn.tx, conn.tx_len = [], 0
        self.stats.handled[f"tcp.closed.{reason.split(':')[0]}"] += 1
        if self.on_close is not None:
            self.on_close(conn, reason)


def is_done(conn: TcpConn) -> bool:
    return st.is_closed(conn.events)
