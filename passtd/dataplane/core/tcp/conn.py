"""One translated TCP connection: sequence bookkeeping for the guest side, and the host socket behind it.

The host socket is reached through `SockPort`, a narrow interface the shell implements over a real socket
(dataplane/io/tcp.py) and tests implement with a fake. Everything here is plain data and arithmetic.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from passtd.dataplane.core.flowtable import Flow, NamedSocket
from passtd.dataplane.packets.tcp import SegmentBuilder


class TcpInfo(NamedTuple):
    """What the shell reads from TCP_INFO (and SO_SNDBUF) for mirroring."""

    bytes_acked: int  # payload bytes the host peer acknowledged (SYN excluded)
    snd_wnd: int  # the peer's receive window
    sndbuf: int  # room the socket has for unacknowledged data
    rtt_us: int
    retransmits: int


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


@dataclass(slots=True, eq=False)
class TcpConn(Flow):
    v6: bool = False
    local: bool = False  # the host-side peer is this host itself (loopback or one of its addresses)
    events: int = 0
    sock: SockPort | None = None
    seg: SegmentBuilder | None = None
    close_reason: str = ""
    closing: bool = False  # marked closed; reaped (socket closed, flow freed) at the end of the event
    close_reset: bool = False  # reaped with an abortive close (SO_LINGER 0) rather than an orderly one
    # Toward the guest (host → guest data)
    seq_init_to_tap: int = 0
    seq_to_tap: int = 0  # next sequence number we send
    seq_max_to_tap: int = 0  # highest sequence number sent so far (before any rewind)
    seq_ack_from_tap: int = 0  # last byte the guest acknowledged
    wnd_from_tap: int = 0  # the guest's window, scaled, in bytes
    ws_from_tap: int = 0  # shift applied to the guest's window field
    mss_to_tap: int = 536  # largest payload the guest accepts (RFC 9293 default)
    dup_acks: int = 0
    fin_seq: int = 0  # sequence number of our FIN, once EV_HOST_FIN_SENT
    cwnd: int = 0  # after a loss: bytes we may have in flight (slow start); 0: only the guest's window limits
    drained: bool = False  # the last peek found nothing beyond seq_max_to_tap (cleared on readiness)
    sock_eof: bool = False  # the socket signalled the peer's FIN (it may still hold data before it)
    recover: int = 0  # highest sequence sent when we last rewound; duplicate ACKs below it are ignored
    # From the guest (guest → host data)
    seq_init_from_tap: int = 0
    seq_from_tap: int = 0  # next byte expected from the guest
    seq_ack_to_tap: int = 0  # last ACK number we sent
    wnd_to_tap: int = 0  # last window we advertised, bytes
    ws_to_tap: int = 0  # shift we apply to the window field we send
    written: int = 0  # bytes of guest data written into the socket
    tx: list[builtins.memoryview] = field(default_factory=list)  # guest data of this batch, not written yet
    tx_len: int = 0
    tx_more: bool = False  # the last of it had no PSH (more follows)
    batch_data: int = 0  # of which in the current batch (a small amount is a request: see prepare_acks)
    clamp: int = -1  # last TCP_WINDOW_CLAMP set on the socket
    # Room in the socket's send buffer at the last TCP_INFO read, and `written` then (a local peer's window
    # is estimated from these while plenty is left, saving two syscalls per ACK)
    info_free: int = 0
    info_written: int = -1
    info_sndbuf: int = 0
    # RFC 6298 retransmission timer for data toward the guest
    srtt: float = 0.0
    rttvar: float = 0.0
    rto: float = 1.0
    rtt_seq: int = -1  # sequence number being timed, -1 when none (Karn: never a retransmitted one)
    rtt_sent: float = 0.0
    rto_due: float = 0.0  # 0: not armed
    retransmits: int = 0
    total_retransmits: int = 0
    persist_due: float = 0.0  # zero-window probe
    ack_due: float = 0.0  # re-check TCP_INFO to ACK the guest's data
    fin_since: float = 0.0  # when the first FIN was seen, for the FIN timeout
    last_tap: float = 0.0
    last_sock: float = 0.0
    scheduled: float = 0.0  # deadline currently in the timer heap (0: none)

    def host_socket(self) -> NamedSocket | None:
        return self.sock

    @property
    def in_flight(self) -> int:
        """Bytes sent to the guest and not yet acknowledged (the socket still holds them)."""
        return (self.seq_to_tap - self.seq_ack_from_tap) & 0xFFFFFFFF
