"""Opening flows both ways: the guest's SYN (connect() on the host, then SYN-ACK), a host peer accepted on a
forwarded port (SYN to the guest), the options each side offers, and the cap on half-open guest flows."""

from __future__ import annotations

from typing import Final

from passtd.dataplane.core.context import is_loopback
from passtd.dataplane.core.flowtable import PROTO_TCP, V4_MAPPED, FlowKey, FlowTableFull, key_addr
from passtd.dataplane.core.icmp import remote_as_seen
from passtd.dataplane.core.tcp import states as st
from passtd.dataplane.core.tcp.base import PRESSURE_SYN_TIMEOUT
from passtd.dataplane.core.tcp.conn import SockPort, TcpConn
from passtd.dataplane.core.tcp.datapath import TcpData
from passtd.dataplane.core.tcp.seq import seq_add
from passtd.dataplane.core.tcp.window import MAX_WINDOW
from passtd.dataplane.core.udp import target_for
from passtd.dataplane.packets.tcp import ACK, SYN, SegmentBuilder, TcpHeader, syn_options

OUR_WS: Final = 8  # window scale we offer: windows up to 16 MiB
DEFAULT_MSS: Final = 536  # RFC 9293 §3.7.1, when the guest sends no MSS option


class TcpHandshake(TcpData):
    # ------------------------------------------------------------------------------- guest → host flows

    def _tap_syn(self, v6: bool, src: bytes, dst: bytes, tcp: TcpHeader, key: FlowKey, now: float) -> None:
        """Guest → host: open a host socket toward the destination (mapped: core/icmp.map_target, and DNS to
        a --dns-forward address goes to the host's resolver, core/udp.target_for)."""
        ctx = self.ctx
        if (v6 and ctx.ip6 is None) or (not v6 and ctx.ip4 is None):
            self.stats.drop("tcp.family_disabled")
            self._rst_unknown(v6, src, dst, tcp)
            return
        egress = self.egress
        if egress.policy is not None and not egress.check(PROTO_TCP, v6, src, tcp.sport, dst, tcp.dport, now):
            self.stats.drop("egress.tcp")  # refused as a closed port would be: the guest's connect fails now
            self._rst_unknown(v6, src, dst, tcp)
            return
        half_open = self._half_open
        if len(half_open) >= self.half_open_pressure:
            self._expire_half_open(now)
        if len(half_open) >= self.half_open_max:
            # A SYN flood (or a burst the host cannot connect fast enough): the oldest handshake gives way,
            # as in a SYN cache. Refusing the newest instead would refuse every genuine connection for as
            # long as the flood lasts; this way one that completes (in milliseconds, against the flood's
            # cap / rate) still gets through, and the flood only ever holds `half_open_max` sockets.
            if not half_open:  # a cap of 0: no handshake at all
                self.stats.drop("tcp.half_open_full")
                self._rst_unknown(v6, src, dst, tcp)
                return
            oldest = next(iter(half_open.values()))
            self.stats.drop("tcp.half_open_evicted")
            self._close(oldest, "half_open_evicted", reset_sock=True, rst_tap=True)
        conn = TcpConn(
            self.flows.new_id(), PROTO_TCP, key, now, now, guest_initiated=True, v6=v6,
            guest_addr=bytes(src), guest_port=tcp.sport, remote_addr=bytes(dst), remote_port=tcp.dport,
            target_addr=target_for(ctx, bytes(dst), tcp.dport),
        )  # fmt: skip
        conn.local = is_loopback(conn.target_addr)
        # Nothing can be in a socket that is not connected yet: the peek when the handshake completes is only
        # needed if readiness was signalled meanwhile (`sock_readable` clears this), which saves a syscall and
        # an exception per connection whose host side does not speak first.
        conn.drained = True
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
        half_open[conn.flow_id] = conn
        self._set(conn, st.EV_GUEST_SYN)
        self.stats.handled["tcp.syn"] += 1
        try:
            conn.sock = self.sockets.connect(conn)
        except OSError as exc:
            self._close(conn, f"connect_failed:{exc.errno}", reset_sock=False, rst_tap=False)
            self._rst_unknown(v6, src, dst, tcp)
            return
        self._schedule(conn)

    def _expire_half_open(self, now: float) -> None:
        """Under pressure, guest-initiated handshakes older than PRESSURE_SYN_TIMEOUT are given up, oldest
        first (the dict is in order of creation; `_close` takes each out of it)."""
        half_open = self._half_open
        while half_open and len(half_open) >= self.half_open_pressure:
            conn = next(iter(half_open.values()))
            if conn.created + PRESSURE_SYN_TIMEOUT > now:
                break
            self.stats.handled["tcp.half_open_expired"] += 1
            self._close(conn, "timeout", reset_sock=True, rst_tap=True)

    def sock_connected(self, conn: TcpConn, now: float) -> None:
        """connect() completed: answer the guest's SYN. The guest's ACK may be lost (and the host peer may be
        the one to speak first): the SYN-ACK is sent again on the RTO until it comes."""
        self._now = now
        if not conn.events & st.EV_GUEST_SYN or conn.closing:
            return
        conn.last_sock = now
        self._set(conn, st.EV_SYN_ACK_SENT)
        self._send_syn(conn, ACK)
        conn.rto_due = now + conn.rto
        self._schedule(conn)

    def sock_error(self, conn: TcpConn, reason: str, now: float) -> None:
        """connect() failed or the socket broke: RST to the guest at once (refused connects included)."""
        self._now = now
        self._close(conn, reason, reset_sock=True, rst_tap=True)
        self._reap()

    # ------------------------------------------------------------------------------- host → guest flows

    def accepted(
        self, sock: SockPort, peer: bytes, peer_port: int, guest_port: int, now: float, target: bytes = b""
    ) -> TcpConn | None:
        """Host → guest: a peer connected to a forwarded port; send a SYN to the guest (again on the RTO).
        A peer on the host's loopback appears to come from the gateway address (unless --no-map-gw).
        `target` (packed, the forwarding rule's target address) replaces the guest's own address."""
        self._now = now
        v6 = len(peer) == 16
        mapped = v6 and peer[:12] == V4_MAPPED
        if mapped:
            peer, v6 = peer[12:], False
        net4, net6 = self.ctx.ip4, self.ctx.ip6
        if (v6 and net6 is None) or (not v6 and net4 is None):
            sock.reset()
            self.stats.drop("tcp.family_disabled")
            return None
        remote = remote_as_seen(self.ctx, peer)
        guest_addr = target if len(target) == (16 if v6 else 4) else self._guest_address(v6)
        key = (PROTO_TCP, key_addr(remote), peer_port, guest_port)
        old = self.flows.get(key)
        if old is not None:
            if isinstance(old, TcpConn):
                self._close(old, "replaced", reset_sock=True, rst_tap=True)
                self._reap_now(old)  # its key is taken again below
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
        self._set(conn, st.EV_ACCEPTED)
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
        self._set(conn, st.EV_ESTABLISHED)
        conn.rto_due = 0.0
        conn.retransmits = 0
        self._send(conn, ACK)
        self._on_established(conn, now)
        self._schedule(conn)

    # ------------------------------------------------------------------------------------------- shared

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
        """Our SYN (extra 0) or SYN-ACK (extra ACK), first or again: from the initial sequence number."""
        ws = OUR_WS if (conn.ws_to_tap or extra == 0) else -1
        conn.wnd_to_tap = 0xFFFF if ws < 0 else min(MAX_WINDOW, 0xFFFF << OUR_WS)
        window_shift, conn.ws_to_tap = conn.ws_to_tap, 0  # the SYN's window field is unscaled
        conn.seq_to_tap = conn.seq_init_to_tap
        self._send(conn, SYN | extra, options=syn_options(self._mss_limit(conn.v6), ws))
        conn.ws_to_tap = window_shift
        conn.seq_to_tap = conn.seq_max_to_tap = seq_add(conn.seq_init_to_tap, 1)

    def _on_established(self, conn: TcpConn, now: float) -> None:
        self.stats.handled["tcp.established"] += 1
        assert conn.sock is not None
        if not conn.local:  # on loopback a guest-sized MSS would only make the host's own stack slower
            try:
                conn.sock.set_mss(conn.mss_to_tap)
            except OSError:
                pass
        self._push(conn, now)  # data (or EOF) may have arrived while the handshake was going on
