"""What every part of the TCP core shares: the collaborators, frames toward the guest, event bits, the timer
heap, and closing (marked during an event, reaped at its end: rule 5 in states.py).

The core is one object whose methods are grouped by concern in a chain of classes, each module one concern:
this one (shared machinery), batch.py (guest data gathered per tap batch, ACKs and windows toward the guest),
datapath.py (the guest's ACKs, data toward the guest, retransmission), handshake.py (opening flows both ways),
handler.py (dispatch of guest segments, timers, control). Pure helpers: rto.py, window.py, timers.py.
"""

from __future__ import annotations

import errno
import heapq
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from typing import Final, Protocol

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.egress import Egress
from passtd.dataplane.core.flowtable import FlowKey, FlowTable
from passtd.dataplane.core.ratelimit import Shaper
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.tcp import states as st
from passtd.dataplane.core.tcp.conn import SockPort, TcpConn
from passtd.dataplane.core.tcp.seq import isn, seq_add
from passtd.dataplane.core.tcp.timers import flow_deadline
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.packets.ethernet import ETH_P_IP, ETH_P_IPV6
from passtd.dataplane.packets.tcp import ACK, FIN, RST, SYN, SegmentBuilder, TcpHeader

# (ethertype, IP packet or headers, offload, payload after the headers) → the guest. offload -1: a complete
# packet; 0: TCP checksum left to the kernel; > 0: also a super-segment for the kernel to cut at that size
# (see packets/vnet.py). The payload may view a buffer reused later: copy it if it must outlive the call.
TapOut = Callable[[int, bytes, int, bytes | memoryview], None]
COMPLETE: Final = -1

# Half-open guest-initiated connections (connect in progress or SYN-ACK sent): at most HALF_OPEN_MAX (a new
# SYN then evicts the oldest, with RST); from HALF_OPEN_PRESSURE on, those older than PRESSURE_SYN_TIMEOUT
# are given up (three SYN-ACK retransmissions fit in it) instead of being held for the full tcp_syn timeout.
HALF_OPEN_MAX: Final = 4096
HALF_OPEN_PRESSURE: Final = 1024
PRESSURE_SYN_TIMEOUT: Final = 10.0
TIME_WAIT: Final = 60.0  # how long a retransmitted FIN of a closed flow is ACKed again (Linux's TIME_WAIT)
TIME_WAIT_MAX: Final = 4096  # entries; the oldest make way (a guest then gets RST for a late FIN, harmless)


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


@dataclass(slots=True)
class TcpEnv:
    """What the TCP core works with: the dataplane's shared objects and its two ways out (host sockets, the
    tap). `secret` keys the initial sequence numbers (RFC 6528)."""

    ctx: Context
    guest: Guest
    flows: FlowTable
    stats: Stats
    sockets: SocketFactory
    to_tap: TapOut
    secret: bytes
    egress: Egress | None = None  # the shared egress rules (core/egress.py); None: a holder of its own


@dataclass(slots=True)
class TcpHooks:
    """How the shell tunes and watches the core; every field has a default that suits a test."""

    timeouts: Timeouts = field(default_factory=Timeouts)
    on_close: Callable[[TcpConn, str], None] | None = None
    on_state: Callable[[TcpConn, str, str], None] | None = None  # (flow, state name before, after)
    watching: Sized | None = None  # when given, on_state is called only while this is non-empty
    offload: bool = False  # the tap segments and checksums TCP for us (pasta with IFF_VNET_HDR)
    congested: Callable[[], bool] | None = None  # the tap is behind: hold data toward the guest
    shaper: Shaper | None = None  # the guest's rate limits (core/ratelimit.py), shared with UDP and ICMP


class TimeWait:
    """What is left of a flow closed in order after the guest's FIN: enough to ACK that FIN again. A plain
    class (one per closed flow): a dataclass's generated __init__ would run as interpreted code."""

    __slots__ = ("ack", "guest_addr", "seg", "seq", "until", "v6")

    def __init__(
        self, guest_addr: bytes, v6: bool, seg: SegmentBuilder, seq: int, ack: int, until: float
    ) -> None:
        self.guest_addr: Final = guest_addr
        self.v6: Final = v6
        self.seg: Final = seg
        self.seq: Final = seq
        self.ack: Final = ack
        self.until: Final = until


def _never() -> bool:
    return False


class TcpBase:
    def __init__(self, env: TcpEnv, hooks: TcpHooks | None = None) -> None:
        hooks = hooks or TcpHooks()
        self.ctx = env.ctx
        self.guest = env.guest
        self.flows = env.flows
        self.stats = env.stats
        self.sockets = env.sockets
        self.to_tap = env.to_tap
        self.secret = env.secret
        self.egress = env.egress if env.egress is not None else Egress()
        self.timeouts = hooks.timeouts
        self.on_close = hooks.on_close
        self.on_state = hooks.on_state
        self.watching = hooks.watching
        self.offload = hooks.offload
        self.congested: Callable[[], bool] = hooks.congested or _never
        self.shaper = hooks.shaper if hooks.shaper is not None else Shaper()
        # RFC 6528 initial sequence numbers; an attribute so that a test can start a flow just below the wrap.
        self.isn: Callable[[bytes, bytes, int, bytes, int, float], int] = isn
        self._now = 0.0  # time of the event being handled (entry points set it; the reap uses it)
        self._heap: list[tuple[float, int]] = []
        self._ack_pending: dict[int, TcpConn] = {}  # flows to bring the ACK up to date for, at batch end
        self._acks_owed: dict[int, TcpConn] = {}  # pure ACKs held by prepare_acks, see there
        self._tx: dict[int, TcpConn] = {}  # flows with guest data gathered in this batch (flush_tx)
        self._blocked: dict[int, TcpConn] = {}  # flows that stopped sending because the tap was full
        self._closing: dict[int, TcpConn] = {}  # marked closed during this event, reaped at its end
        self._time_wait: dict[FlowKey, TimeWait] = {}  # flows closed in order, by key, oldest first
        # Guest-initiated flows still in their handshake, oldest first; capped against SYN floods.
        self._half_open: dict[int, TcpConn] = {}
        self.half_open_max = HALF_OPEN_MAX
        self.half_open_pressure = HALF_OPEN_PRESSURE
        self.set_half_open_limits(HALF_OPEN_MAX, HALF_OPEN_PRESSURE)

    def set_half_open_limits(self, cap: int, pressure: int) -> None:
        """The half-open cap and the count from which old handshakes are given up early (in the stats)."""
        self.half_open_max = cap
        self.half_open_pressure = pressure
        self.stats.limits["tcp.half_open"] = cap
        self.stats.limits["tcp.half_open_pressure"] = pressure

    @property
    def half_open(self) -> int:
        """Guest-initiated connections still in their handshake."""
        return len(self._half_open)

    def _set(self, conn: TcpConn, bit: int) -> None:
        """Every event goes through states.set_event; observers hear about user-visible state changes (the
        names are only worked out while someone listens: `watching` is the shell's list of listeners)."""
        before = conn.events
        conn.events = st.set_event(before, bit)
        if bit == st.EV_ESTABLISHED and self._half_open:
            self._half_open.pop(conn.flow_id, None)
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

    def _send_ack(self, conn: TcpConn, ack: int) -> None:
        assert conn.seg is not None
        if self._acks_owed:
            self._acks_owed.pop(conn.flow_id, None)
        window = min(conn.wnd_to_tap >> conn.ws_to_tap, 0xFFFF)
        packet = conn.seg.build(conn.seq_to_tap, ack, ACK, window)
        conn.packets_to_guest += 1
        self.to_tap(ETH_P_IPV6 if conn.v6 else ETH_P_IP, packet, 0 if self.offload else COMPLETE, b"")

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

    # --------------------------------------------------------------------------------------------- timers

    def _syn_timeout(self, conn: TcpConn) -> float:
        """The handshake timeout; shorter for guest-initiated flows while many are half-open."""
        t = self.timeouts.tcp_syn
        if conn.guest_initiated and len(self._half_open) >= self.half_open_pressure:
            return min(t, PRESSURE_SYN_TIMEOUT)
        return t

    def _schedule(self, conn: TcpConn) -> None:
        if conn.closing:
            return
        syn_timeout = self._syn_timeout(conn) if conn.events & st.EV_HANDSHAKE else 0.0  # per frame: lazily
        deadline = flow_deadline(conn, self.timeouts, syn_timeout)
        if not conn.scheduled or deadline < conn.scheduled:
            conn.scheduled = deadline
            heapq.heappush(self._heap, (deadline, conn.flow_id))

    # -------------------------------------------------------------------------------------------- closing

    def _sock_failed(self, conn: TcpConn, exc: OSError) -> None:
        """The host side broke: RST to the guest; a peer's RST is named as such for the control API."""
        code = exc.errno or 0
        reason = (
            "rst_from_host" if code == errno.ECONNRESET else f"host_error:{errno.errorcode.get(code, code)}"
        )
        self._close(conn, reason, reset_sock=True, rst_tap=True)

    def _close(self, conn: TcpConn, reason: str, *, reset_sock: bool, rst_tap: bool) -> None:
        """Mark the flow closed: the RST toward the guest goes now (in order with the frames before it), the
        rest when the flow is reaped at the end of the event (`_reap`)."""
        if conn.closing:
            return
        conn.closing = True
        conn.close_reason = reason
        conn.close_reset = reset_sock
        if rst_tap and conn.seg is not None and not conn.events & st.EV_GUEST_SYN:
            self._send(conn, RST | ACK)
        elif rst_tap and conn.seg is not None:
            packet = conn.seg.build(0, conn.seq_from_tap, RST | ACK, 0)
            self.to_tap(ETH_P_IPV6 if conn.v6 else ETH_P_IP, packet, 0 if self.offload else COMPLETE, b"")
        if self._half_open:
            self._half_open.pop(conn.flow_id, None)  # out of the count at once: the cap sees it
        self._closing[conn.flow_id] = conn

    def _reap(self) -> None:
        """End of an event: free the flows marked closed during it."""
        while self._closing:
            closing, self._closing = self._closing, {}
            for conn in closing.values():
                self._free(conn)

    def _reap_now(self, conn: TcpConn) -> None:
        """Free one marked flow before the end of the event (its key is needed again at once)."""
        if self._closing.pop(conn.flow_id, None) is not None:
            self._free(conn)

    def _free(self, conn: TcpConn) -> None:
        if conn.seg is not None and st.is_closed(conn.events) and conn.events & st.EV_GUEST_FIN:
            # Closed in order after the guest's FIN: that FIN is acknowledged now (whatever the host peer
            # acknowledged so far: the socket is closed normally and still delivers), and remembered for a
            # while, so that the guest's retransmission of it (our ACK lost) is ACKed again, not RST.
            if conn.seq_ack_to_tap != conn.seq_from_tap or conn.flow_id in self._acks_owed:
                conn.seq_ack_to_tap = conn.seq_from_tap
                self._send_ack(conn, conn.seq_from_tap)
            self._time_wait_add(conn)
        sock = conn.sock
        if sock is not None:
            self.sockets.forget(conn)
            try:
                if conn.close_reset:
                    sock.reset()
                else:
                    sock.close()
            except OSError:
                pass
        conn.sock = None
        self.flows.remove(conn)
        fid = conn.flow_id
        self._ack_pending.pop(fid, None)
        self._acks_owed.pop(fid, None)
        self._blocked.pop(fid, None)
        self._tx.pop(fid, None)
        conn.tx, conn.tx_len = [], 0
        reason = conn.close_reason
        self.stats.handled[f"tcp.closed.{reason.split(':')[0]}"] += 1
        if self.on_close is not None:
            self.on_close(conn, reason)

    def _time_wait_add(self, conn: TcpConn) -> None:
        assert conn.seg is not None
        tw = self._time_wait
        tw.pop(conn.key, None)
        if len(tw) >= TIME_WAIT_MAX:
            del tw[next(iter(tw))]  # the oldest: entries are added in order of expiry
        tw[conn.key] = TimeWait(conn.guest_addr, conn.v6, conn.seg, conn.seq_to_tap, conn.seq_from_tap,
                                self._now + TIME_WAIT)  # fmt: skip

    def _time_wait_answer(self, key: FlowKey, src: bytes, tcp: TcpHeader, now: float) -> bool:
        """A segment for a flow closed in order a moment ago: re-ACK a retransmitted FIN, ignore the rest.
        True if it was such a segment."""
        tw = self._time_wait
        while tw:  # expired entries go from the front
            first = next(iter(tw))
            if tw[first].until > now:
                break
            del tw[first]
        entry = tw.get(key)
        if entry is None or entry.guest_addr != src:
            return False
        if tcp.flags & (SYN | RST):
            del tw[key]  # the guest moved on (a new connection on the same ports, or an abort)
            return False
        if tcp.flags & FIN:
            packet = entry.seg.build(entry.seq, entry.ack, ACK, 0)
            self.to_tap(ETH_P_IPV6 if entry.v6 else ETH_P_IP, packet, COMPLETE, b"")
            self.stats.handled["tcp.time_wait_ack"] += 1
        return True
