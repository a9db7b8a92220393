"""TCP translation: events, states and the rules between them. THE rules file: read this first.

Theory of operation
-------------------
passtd is not a TCP stack. The guest's kernel talks TCP to passtd over the tap; the host's kernel talks TCP
to the peer through an ordinary socket. A flow mirrors what one side does onto the other, so what it holds
is the set of things that have happened on either side, kept as event bits (as passt does) rather than one
RFC 9293 state. Two bits for each handshake step, two for each direction's FIN (received on one side, relayed
to the other), and one for "the guest acknowledged our FIN".

Two vocabularies, never mixed
    Event bits (`TcpEv`, int aliases `EV_*`) say what happened; the core sets and tests them. State names
    (`TcpState`, a str enum) are what users see (logs, the control API); they are derived from the bits by
    `state_name` and never stored. The state names are the seed's and stay as they are: they name the
    guest's side of the handshake from the guest's point of view, which is why EV_GUEST_SYN (the guest's
    SYN arrived) shows as TAP_SYN_SENT. The bits' passt names are given for reading passt's tcp.c alongside.

Event bits                                                                           (passt's name)
    EV_ACCEPTED         a host peer connected to a forwarded port; we sent a SYN to the guest  SOCK_ACCEPTED
    EV_GUEST_SYN        the guest sent a SYN; connect() on the host socket is in progress     TAP_SYN_RCVD
    EV_SYN_ACK_SENT     connect() completed; we sent SYN-ACK to the guest, wait for its ACK   TAP_SYN_ACK_SENT
    EV_ESTABLISHED      both handshakes done                                                  ESTABLISHED
    EV_HOST_FIN         the host socket reached end of stream (peer's FIN)                    SOCK_FIN_RCVD
    EV_HOST_FIN_SENT    we sent that FIN on to the guest, after every byte before it          SOCK_FIN_SENT
    EV_GUEST_FIN        the guest sent a FIN                                                  TAP_FIN_RCVD
    EV_GUEST_FIN_SENT   we relayed it with shutdown(SHUT_WR), after every byte before it      TAP_FIN_SENT
    EV_GUEST_ACKED_FIN  the guest acknowledged our FIN                                        TAP_FIN_ACKED

Rule 1 (handshake bits are exclusive): EV_ACCEPTED, EV_GUEST_SYN and EV_SYN_ACK_SENT are steps of one
handshake; setting one clears the others, and setting EV_ESTABLISHED clears all three.
Rule 2 (FINs are relayed in order): *_FIN_SENT is set only together with, or after, its *_FIN, and
EV_GUEST_ACKED_FIN only after EV_HOST_FIN_SENT.
Rule 3 (joint close): when both directions are finished (EV_HOST_FIN_SENT + EV_GUEST_ACKED_FIN, and
EV_GUEST_FIN_SENT) the flow is CLOSED: the socket is closed normally and the flow freed. If the guest's FIN
was part of it, the flow's last ACK is remembered for a time-wait, so that a retransmitted FIN is ACKed again.
Rule 4 (reset): an RST from the guest, an error on the socket, a failed connect(), a timeout or a reset
requested through the control API closes both sides at once: RST to the guest, SO_LINGER 0 on the socket.
Rule 5 (close at the end): a flow that closes is marked and keeps its table entry until the end of the
event being handled (a tap batch, a socket event, a timer tick), where it is reaped; work on a marked flow
is skipped, so nothing deep in the data path has to ask whether its flow still exists.

Transitions
-----------
`TRANSITIONS` below is the table of the handshake and teardown, (state, input) → (effect, next state), in
the state names users see. tests/core/test_tcp_core.py drives every row through the core and checks both the
effect and the state reached. The data path inside ESTABLISHED is plain code (handler modules).
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple


class TcpEv(enum.IntFlag):
    """Names for the event bits; the hot path uses the plain int aliases below."""

    ACCEPTED = 1 << 0
    GUEST_SYN = 1 << 1
    SYN_ACK_SENT = 1 << 2
    ESTABLISHED = 1 << 3
    HOST_FIN = 1 << 4
    HOST_FIN_SENT = 1 << 5
    GUEST_FIN = 1 << 6
    GUEST_FIN_SENT = 1 << 7
    GUEST_ACKED_FIN = 1 << 8


EV_ACCEPTED: Final = int(TcpEv.ACCEPTED)
EV_GUEST_SYN: Final = int(TcpEv.GUEST_SYN)
EV_SYN_ACK_SENT: Final = int(TcpEv.SYN_ACK_SENT)
EV_ESTABLISHED: Final = int(TcpEv.ESTABLISHED)
EV_HOST_FIN: Final = int(TcpEv.HOST_FIN)
EV_HOST_FIN_SENT: Final = int(TcpEv.HOST_FIN_SENT)
EV_GUEST_FIN: Final = int(TcpEv.GUEST_FIN)
EV_GUEST_FIN_SENT: Final = int(TcpEv.GUEST_FIN_SENT)
EV_GUEST_ACKED_FIN: Final = int(TcpEv.GUEST_ACKED_FIN)

EV_HANDSHAKE: Final = EV_ACCEPTED | EV_GUEST_SYN | EV_SYN_ACK_SENT
EV_CLOSING: Final = EV_HOST_FIN | EV_GUEST_FIN
EV_DONE: Final = EV_HOST_FIN_SENT | EV_GUEST_ACKED_FIN | EV_GUEST_FIN_SENT
EV_ALL: Final = (1 << 9) - 1

_IMPLIES: Final = {
    EV_HOST_FIN_SENT: EV_HOST_FIN,
    EV_GUEST_FIN_SENT: EV_GUEST_FIN,
    EV_GUEST_ACKED_FIN: EV_HOST_FIN_SENT,
}


class TcpState(enum.StrEnum):
    """The state names users see (logs, the control API), derived from the event bits by `state_name`."""

    CLOSED = "CLOSED"
    TAP_SYN_SENT = "TAP_SYN_SENT"  # the guest's SYN is being connected on the host
    SOCK_SYN_SENT = "SOCK_SYN_SENT"  # a host peer was accepted; our SYN is out to the guest
    TAP_SYN_RCVD = "TAP_SYN_RCVD"  # our SYN-ACK is out to the guest
    ESTABLISHED = "ESTABLISHED"
    ESTABLISHED_SOCK_FIN = "ESTABLISHED_SOCK_FIN"  # the host closed; its FIN is out to the guest
    CLOSE_WAIT = "CLOSE_WAIT"  # the guest acknowledged that FIN
    FIN_WAIT_1 = "FIN_WAIT_1"  # the guest closed; its FIN is relayed
    LAST_ACK = "LAST_ACK"  # both closed; waiting for the guest's last ACK


def set_event(events: int, bit: int) -> int:
    """The only way event bits change: applies rules 1 and 2 and returns the new set."""
    if bit & EV_HANDSHAKE:
        return (events & ~EV_HANDSHAKE) | bit
    if bit == EV_ESTABLISHED:
        return (events & ~EV_HANDSHAKE) | EV_ESTABLISHED
    implied = _IMPLIES.get(bit, 0)
    if implied and not events & implied:
        raise ValueError(f"{TcpEv(bit).name} before {TcpEv(implied).name}")
    return events | bit


def is_closed(events: int) -> bool:
    """Rule 3: both directions finished."""
    return events & EV_DONE == EV_DONE


def in_handshake(events: int) -> bool:
    return bool(events & EV_HANDSHAKE)


def state_name(events: int) -> str:
    """The user-facing state (a `TcpState` value) for logs and the control API."""
    if events == 0 or is_closed(events):
        return TcpState.CLOSED.value
    if events & EV_GUEST_SYN:
        return TcpState.TAP_SYN_SENT.value
    if events & EV_ACCEPTED:
        return TcpState.SOCK_SYN_SENT.value
    if events & EV_SYN_ACK_SENT:
        return TcpState.TAP_SYN_RCVD.value
    host_fin = bool(events & EV_HOST_FIN)
    guest_fin = bool(events & EV_GUEST_FIN)
    if host_fin and guest_fin:
        return TcpState.LAST_ACK.value
    if guest_fin:
        return TcpState.FIN_WAIT_1.value
    if host_fin:
        return (
            TcpState.CLOSE_WAIT.value if events & EV_GUEST_ACKED_FIN else TcpState.ESTABLISHED_SOCK_FIN.value
        )
    return TcpState.ESTABLISHED.value


STATE_NAMES: Final = tuple(s.value for s in TcpState)


class Transition(NamedTuple):
    state: TcpState
    input: str
    effect: str
    next: TcpState


_S = TcpState
TRANSITIONS: Final = (
    # Guest-initiated handshake
    Transition(_S.CLOSED, "guest SYN", "connect() on a host socket", _S.TAP_SYN_SENT),
    Transition(
        _S.CLOSED,
        "guest SYN, half-open cap reached",
        "RST to the guest (cap 0), else the oldest handshake is reset and this one connects",
        _S.CLOSED,
    ),
    Transition(_S.TAP_SYN_SENT, "connect() completed", "SYN-ACK to the guest, RTO armed", _S.TAP_SYN_RCVD),
    Transition(_S.TAP_SYN_SENT, "connect() failed", "RST to the guest", _S.CLOSED),
    Transition(_S.TAP_SYN_RCVD, "guest ACK of our SYN", "send what the host sent meanwhile", _S.ESTABLISHED),
    Transition(_S.TAP_SYN_RCVD, "guest ACK of something else", "RST both sides", _S.CLOSED),
    Transition(_S.TAP_SYN_RCVD, "guest SYN again", "SYN-ACK again", _S.TAP_SYN_RCVD),
    Transition(_S.TAP_SYN_RCVD, "RTO", "SYN-ACK again, RTO doubled", _S.TAP_SYN_RCVD),
    Transition(_S.TAP_SYN_RCVD, "RTO, retransmissions exhausted", "RST both sides", _S.CLOSED),
    # Host-initiated handshake
    Transition(_S.CLOSED, "host peer accepted", "SYN to the guest, RTO armed", _S.SOCK_SYN_SENT),
    Transition(_S.SOCK_SYN_SENT, "guest SYN-ACK", "ACK to the guest", _S.ESTABLISHED),
    Transition(_S.SOCK_SYN_SENT, "RTO", "SYN again, RTO doubled", _S.SOCK_SYN_SENT),
    Transition(_S.SOCK_SYN_SENT, "RTO, retransmissions exhausted", "RST both sides", _S.CLOSED),
    # Either handshake
    Transition(_S.TAP_SYN_SENT, "handshake timeout", "RST both sides", _S.CLOSED),
    # Teardown, host first
    Transition(
        _S.ESTABLISHED, "host end of stream", "FIN to the guest after the data", _S.ESTABLISHED_SOCK_FIN
    ),
    Transition(_S.ESTABLISHED_SOCK_FIN, "guest ACK of our FIN", "-", _S.CLOSE_WAIT),
    Transition(_S.CLOSE_WAIT, "guest FIN", "shutdown(SHUT_WR), ACK, time-wait", _S.CLOSED),
    Transition(_S.CLOSED, "guest FIN again (time-wait)", "ACK again", _S.CLOSED),
    # Teardown, guest first
    Transition(_S.ESTABLISHED, "guest FIN", "shutdown(SHUT_WR) after the data, ACK", _S.FIN_WAIT_1),
    Transition(_S.FIN_WAIT_1, "guest FIN again", "ACK again", _S.FIN_WAIT_1),
    Transition(_S.FIN_WAIT_1, "host end of stream", "FIN to the guest after the data", _S.LAST_ACK),
    Transition(_S.LAST_ACK, "guest ACK of our FIN", "socket closed normally", _S.CLOSED),
    # Anywhere
    Transition(_S.ESTABLISHED, "guest RST", "SO_LINGER 0 on the socket", _S.CLOSED),
    Transition(_S.ESTABLISHED, "socket error", "RST to the guest", _S.CLOSED),
)
