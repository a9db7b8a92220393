"""TCP translation: events, states and the rules between them. THE rules file: read this first.

Theory of operation
-------------------
passtd is not a TCP stack. The guest's kernel talks TCP to passtd over the tap; the host's kernel talks TCP
to the peer through an ordinary socket. A flow mirrors what one side does onto the other, so its "state" is
the set of things that have happened on either side, kept as event bits (as passt does) rather than one
RFC 9293 state. Two bits for each handshake step, two for each direction's FIN (received on one side, relayed
to the other), and one for "the guest acknowledged our FIN".

Event bits
    SOCK_ACCEPTED     a host peer connected to a forwarded port; we sent a SYN to the guest
    TAP_SYN_RCVD      the guest sent a SYN; connect() on the host socket is in progress
    TAP_SYN_ACK_SENT  connect() completed; we sent SYN-ACK to the guest and wait for its ACK
    ESTABLISHED       both handshakes done
    SOCK_FIN_RCVD     the host socket reached end of stream (peer's FIN)
    SOCK_FIN_SENT     we sent that FIN on to the guest, after every byte before it
    TAP_FIN_RCVD      the guest sent a FIN
    TAP_FIN_SENT      we relayed it with shutdown(SHUT_WR), after writing every byte before it
    TAP_FIN_ACKED     the guest acknowledged our FIN

Rule 1 (handshake bits are exclusive): SOCK_ACCEPTED, TAP_SYN_RCVD and TAP_SYN_ACK_SENT are steps of one
handshake; setting one clears the others, and setting ESTABLISHED clears all three.
Rule 2 (FINs are relayed in order): *_FIN_SENT is set only together with, or after, its *_FIN_RCVD.
Rule 3 (joint close): when both directions are finished (SOCK_FIN_SENT + TAP_FIN_ACKED, and TAP_FIN_SENT)
the flow is CLOSED: the socket is closed normally and the flow freed.
Rule 4 (reset): an RST from the guest, an error on the socket, a failed connect(), a timeout or a reset
requested through the control API closes both sides at once: RST to the guest, SO_LINGER 0 on the socket.

The state names shown to users (logs, control API) are derived from the bits by `state_name`:
CLOSED, TAP_SYN_SENT (connect in progress for a guest SYN), SOCK_SYN_SENT (accepted, SYN sent to the guest),
TAP_SYN_RCVD (SYN-ACK sent to the guest), ESTABLISHED, ESTABLISHED_SOCK_FIN (host closed, FIN sent to the
guest), CLOSE_WAIT (the guest acknowledged that FIN), FIN_WAIT_1 (the guest closed, FIN relayed),
LAST_ACK (both closed, waiting for the guest's last ACK).
"""

from __future__ import annotations

import enum
from typing import Final


class TcpEv(enum.IntFlag):
    """Names for the event bits; the hot path uses the plain int aliases below."""

    SOCK_ACCEPTED = 1 << 0
    TAP_SYN_RCVD = 1 << 1
    TAP_SYN_ACK_SENT = 1 << 2
    ESTABLISHED = 1 << 3
    SOCK_FIN_RCVD = 1 << 4
    SOCK_FIN_SENT = 1 << 5
    TAP_FIN_RCVD = 1 << 6
    TAP_FIN_SENT = 1 << 7
    TAP_FIN_ACKED = 1 << 8


SOCK_ACCEPTED: Final = int(TcpEv.SOCK_ACCEPTED)
TAP_SYN_RCVD: Final = int(TcpEv.TAP_SYN_RCVD)
TAP_SYN_ACK_SENT: Final = int(TcpEv.TAP_SYN_ACK_SENT)
ESTABLISHED: Final = int(TcpEv.ESTABLISHED)
SOCK_FIN_RCVD: Final = int(TcpEv.SOCK_FIN_RCVD)
SOCK_FIN_SENT: Final = int(TcpEv.SOCK_FIN_SENT)
TAP_FIN_RCVD: Final = int(TcpEv.TAP_FIN_RCVD)
TAP_FIN_SENT: Final = int(TcpEv.TAP_FIN_SENT)
TAP_FIN_ACKED: Final = int(TcpEv.TAP_FIN_ACKED)

HANDSHAKE: Final = SOCK_ACCEPTED | TAP_SYN_RCVD | TAP_SYN_ACK_SENT
CLOSING: Final = SOCK_FIN_RCVD | TAP_FIN_RCVD
DONE: Final = SOCK_FIN_SENT | TAP_FIN_ACKED | TAP_FIN_SENT
ALL: Final = (1 << 9) - 1

_IMPLIES: Final = {SOCK_FIN_SENT: SOCK_FIN_RCVD, TAP_FIN_SENT: TAP_FIN_RCVD, TAP_FIN_ACKED: SOCK_FIN_SENT}


def set_event(events: int, bit: int) -> int:
    """The only way event bits change: applies rules 1 and 2 and returns the new set."""
    if bit & HANDSHAKE:
        return (events & ~HANDSHAKE) | bit
    if bit == ESTABLISHED:
        return (events & ~HANDSHAKE) | ESTABLISHED
    implied = _IMPLIES.get(bit, 0)
    if implied and not events & implied:
        raise ValueError(f"{TcpEv(bit).name} before {TcpEv(implied).name}")
    return events | bit


def is_closed(events: int) -> bool:
    """Rule 3: both directions finished."""
    return events & DONE == DONE


def in_handshake(events: int) -> bool:
    return bool(events & HANDSHAKE)


def state_name(events: int) -> str:
    """The user-facing state for logs and the control API."""
    if events == 0 or is_closed(events):
        return "CLOSED"
    if events & TAP_SYN_RCVD:
        return "TAP_SYN_SENT"
    if events & SOCK_ACCEPTED:
        return "SOCK_SYN_SENT"
    if events & TAP_SYN_ACK_SENT:
        return "TAP_SYN_RCVD"
    sock_fin = bool(events & SOCK_FIN_RCVD)
    tap_fin = bool(events & TAP_FIN_RCVD)
    if sock_fin and tap_fin:
        return "LAST_ACK"
    if tap_fin:
        return "FIN_WAIT_1"
    if sock_fin:
        return "CLOSE_WAIT" if events & TAP_FIN_ACKED else "ESTABLISHED_SOCK_FIN"
    return "ESTABLISHED"


STATE_NAMES: Final = (
    "CLOSED",
    "TAP_SYN_SENT",
    "SOCK_SYN_SENT",
    "TAP_SYN_RCVD",
    "ESTABLISHED",
    "ESTABLISHED_SOCK_FIN",
    "CLOSE_WAIT",
    "FIN_WAIT_1",
    "LAST_ACK",
)
