"""What to acknowledge to the guest and which window to offer it, as a pure function of the socket's numbers.

passtd ACKs the guest's data only once the host side has it for good, so a lost byte is always still in the
guest's send queue: up to what the host peer acknowledged (TCP_INFO), or, for a peer on this host, up to what
its kernel took. The window is what the socket can still take, so that nothing the guest sends is dropped for
want of buffer (a drop would cost the guest a retransmission round).
"""

from __future__ import annotations

from typing import Final

from passtd.dataplane.core.tcp.seq import seq_add

MAX_WINDOW: Final = (1 << 24) - 1  # with our window scale (8) the field reaches 16 MiB


def socket_room(written: int, peer_acked: int, sndbuf: int, local: bool) -> tuple[int, int, int]:
    """(acked, free, queued) from a TCP_INFO reading: what counts as acknowledged, the room left in the send
    buffer (SO_SNDBUF counts the kernel's overhead too, hence the margin), and what the peer has not ACKed.
    A local peer's kernel cannot lose what it took, and waiting for a local reader's delayed ACK would stall
    the guest for tens of milliseconds: for it, everything written counts."""
    peer_acked = min(peer_acked, written)
    queued = written - peer_acked
    acked = written if local else peer_acked
    return acked, max(0, sndbuf * 3 // 4 - queued), queued


def ack_window(
    seq_init: int, seq_next: int, written: int, acked: int, free: int, fin_relayed: bool, scaled: bool
) -> tuple[int, int]:
    """(ACK number, window in bytes) for the guest. The ACK covers the guest's bytes the host side has
    (`acked` of the `written` ones after the guest's ISN `seq_init`), and its FIN once that is relayed and
    everything before it is acknowledged (`seq_next` is then one past the FIN). The window is what is
    written but unacknowledged plus the room left. A plain tuple: compiled, it is returned unboxed."""
    ack = seq_next if fin_relayed and acked == written else seq_add(seq_init, 1 + acked)
    wnd = (written - acked) + free
    limit = MAX_WINDOW if scaled else 0xFFFF
    return ack, (wnd if wnd < limit else limit)
