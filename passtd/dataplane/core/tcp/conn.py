"""One translated TCP connection: sequence bookkeeping for the guest side, and the host socket behind it.

The host socket is reached through `SockPort`, a narrow interface the shell implements over a real socket
(dataplane/io/tcp.py) and tests implement with a fake. Everything here is plain data and arithmetic.
"""

from __future__ import annotations

import builtins
from typing import Final, Protocol

from passtd.dataplane.core.flowtable import Flow, FlowKey, NamedSocket
from passtd.dataplane.packets.tcp import SegmentBuilder


class TcpInfo:
    """What the shell reads from TCP_INFO (and SO_SNDBUF) for mirroring. A plain class: a NamedTuple is
    built by interpreted code even from compiled callers, and this is read on the ACK path."""

    __slots__ = ("bytes_acked", "retransmits", "rtt_us", "snd_wnd", "sndbuf")

    def __init__(self, bytes_acked: int, snd_wnd: int, sndbuf: int, rtt_us: int, retransmits: int) -> None:
        self.bytes_acked: Final = bytes_acked  # payload bytes the host peer acknowledged (SYN excluded)
        self.snd_wnd: Final = snd_wnd  # the peer's receive window
        self.sndbuf: Final = sndbuf  # room the socket has for unacknowledged data
        self.rtt_us: Final = rtt_us
        self.retransmits: Final = retransmits


class SockPort(Protocol):
    """The host socket as the TCP core sees it. Errors surface as OSError."""

    def peek(self, offset: int, size: int) -> memoryview | None:
        """Up to `size` received bytes starting `offset` bytes into the receive queue, without consuming them.
        None: nothing new yet. Empty view: end of stream and nothing beyond `offset`."""
        ...

    def discard(self, n: int) -> None:
        """Drop `n` bytes from the front of the receive queue (the guest acknowledged them)."""
        ...

    def send(self, chunks: list[memoryview], more: bool) -> int:
        """Write what the socket takes now of the chunks, in order (one sendmsg); 0 when it is full."""
        ...

    def shutdown_write(self) -> None: ...

    def info(self) -> TcpInfo: ...

    def set_window_clamp(self, size: int) -> None: ...

    def set_mss(self, mss: int) -> None: ...

    def close(self) -> None:
        """Orderly close (FIN already exchanged)."""
        ...

    def reset(self) -> None:
        """Abortive close: RST to the peer (SO_LINGER 0)."""
        ...

    def getsockname(self) -> object:
        """The socket's local name, for the control views (io/sockets.py `local_name`)."""
        ...


class TcpConn(Flow):
    """One flow's state. A plain class with an explicit __init__, not a dataclass (see __init__)."""

    __slots__ = (
        "ack_due",
        "batch_data",
        "clamp",
        "close_reason",
        "close_reset",
        "closing",
        "cwnd",
        "drained",
        "dup_acks",
        "events",
        "fin_seq",
        "fin_since",
        "info_free",
        "info_sndbuf",
        "info_written",
        "last_sock",
        "last_tap",
        "local",
        "mss_to_tap",
        "persist_due",
        "recover",
        "retransmits",
        "rto",
        "rto_due",
        "rtt_sent",
        "rtt_seq",
        "rttvar",
        "scheduled",
        "seg",
        "seq_ack_from_tap",
        "seq_ack_to_tap",
        "seq_from_tap",
        "seq_init_from_tap",
        "seq_init_to_tap",
        "seq_max_to_tap",
        "seq_to_tap",
        "sock",
        "sock_eof",
        "srtt",
        "total_retransmits",
        "tx",
        "tx_len",
        "tx_more",
        "v6",
        "wnd_from_tap",
        "wnd_to_tap",
        "written",
        "ws_from_tap",
        "ws_to_tap",
    )

    v6: bool
    local: bool  # the host-side peer is this host itself (loopback or one of its addresses)
    events: int
    sock: SockPort | None
    seg: SegmentBuilder | None
    close_reason: str
    closing: bool  # marked closed; reaped (socket closed, flow freed) at the end of the event
    close_reset: bool  # reaped with an abortive close (SO_LINGER 0) rather than an orderly one
    # Toward the guest (host → guest data)
    seq_init_to_tap: int
    seq_to_tap: int  # next sequence number we send
    seq_max_to_tap: int  # highest sequence number sent so far (before any rewind)
    seq_ack_from_tap: int  # last byte the guest acknowledged
    wnd_from_tap: int  # the guest's window, scaled, in bytes
    ws_from_tap: int  # shift applied to the guest's window field
    mss_to_tap: int  # largest payload the guest accepts (RFC 9293 default)
    dup_acks: int
    fin_seq: int  # sequence number of our FIN, once EV_HOST_FIN_SENT
    cwnd: int  # after a loss: bytes we may have in flight (slow start); 0: only the guest's window limits
    drained: bool  # the last peek found nothing beyond seq_max_to_tap (cleared on readiness)
    sock_eof: bool  # the socket signalled the peer's FIN (it may still hold data before it)
    recover: int  # highest sequence sent when we last rewound; duplicate ACKs below it are ignored
    # From the guest (guest → host data)
    seq_init_from_tap: int
    seq_from_tap: int  # next byte expected from the guest
    seq_ack_to_tap: int  # last ACK number we sent
    wnd_to_tap: int  # last window we advertised, bytes
    ws_to_tap: int  # shift we apply to the window field we send
    written: int  # bytes of guest data written into the socket
    tx: list[builtins.memoryview]  # guest data of this batch, not written yet
    tx_len: int
    tx_more: bool  # the last of it had no PSH (more follows)
    batch_data: int  # of which in the current batch (a small amount is a request: see prepare_acks)
    clamp: int  # last TCP_WINDOW_CLAMP set on the socket
    # Room in the socket's send buffer at the last TCP_INFO read, and `written` then (a local peer's window
    # is estimated from these while plenty is left, saving two syscalls per ACK)
    info_free: int
    info_written: int
    info_sndbuf: int
    # RFC 6298 retransmission timer for data toward the guest
    srtt: float
    rttvar: float
    rto: float
    rtt_seq: int  # sequence number being timed, -1 when none (Karn: never a retransmitted one)
    rtt_sent: float
    rto_due: float  # 0: not armed
    retransmits: int
    total_retransmits: int
    persist_due: float  # zero-window probe
    ack_due: float  # re-check TCP_INFO to ACK the guest's data
    fin_since: float  # when the first FIN was seen, for the FIN timeout
    last_tap: float
    last_sock: float
    scheduled: float  # deadline currently in the timer heap (0: none)

    def __init__(
        self,
        flow_id: int,
        proto: int,
        key: FlowKey,
        created: float,
        last_active: float,
        *,
        guest_initiated: bool = True,
        v6: bool = False,
        guest_addr: bytes = b"",
        guest_port: int = 0,
        remote_addr: bytes = b"",
        remote_port: int = 0,
        target_addr: bytes = b"",
        sock: SockPort | None = None,
        local: bool = False,
    ) -> None:
        # Every field set here, the base's included: a dataclass's generated __init__ runs as interpreted
        # code even when the class is compiled, and a connection is created per guest SYN.
        self.flow_id = flow_id
        self.proto = proto
        self.key = key
        self.created = created
        self.last_active = last_active
        self.guest_initiated = guest_initiated
        self.bytes_from_guest = 0
        self.bytes_to_guest = 0
        self.packets_from_guest = 0
        self.packets_to_guest = 0
        self.host_fds = 1
        self.guest_addr = guest_addr
        self.guest_port = guest_port
        self.remote_addr = remote_addr
        self.remote_port = remote_port
        self.target_addr = target_addr
        self.tally = None
        self.v6 = v6
        self.local = local
        self.events = 0
        self.sock = sock
        self.seg = None
        self.close_reason = ""
        self.closing = False
        self.close_reset = False
        self.seq_init_to_tap = 0
        self.seq_to_tap = 0
        self.seq_max_to_tap = 0
        self.seq_ack_from_tap = 0
        self.wnd_from_tap = 0
        self.ws_from_tap = 0
        self.mss_to_tap = 536
        self.dup_acks = 0
        self.fin_seq = 0
        self.cwnd = 0
        self.drained = False
        self.sock_eof = False
        self.recover = 0
        self.seq_init_from_tap = 0
        self.seq_from_tap = 0
        self.seq_ack_to_tap = 0
        self.wnd_to_tap = 0
        self.ws_to_tap = 0
        self.written = 0
        self.tx = []
        self.tx_len = 0
        self.tx_more = False
        self.batch_data = 0
        self.clamp = -1
        self.info_free = 0
        self.info_written = -1
        self.info_sndbuf = 0
        self.srtt = 0.0
        self.rttvar = 0.0
        self.rto = 1.0
        self.rtt_seq = -1
        self.rtt_sent = 0.0
        self.rto_due = 0.0
        self.retransmits = 0
        self.total_retransmits = 0
        self.persist_due = 0.0
        self.ack_due = 0.0
        self.fin_since = 0.0
        self.last_tap = 0.0
        self.last_sock = 0.0
        self.scheduled = 0.0

    def host_socket(self) -> NamedSocket | None:
        return self.sock

    @property
    def in_flight(self) -> int:
        """Bytes sent to the guest and not yet acknowledged (the socket still holds them)."""
        return (self.seq_to_tap - self.seq_ack_from_tap) & 0xFFFFFFFF
