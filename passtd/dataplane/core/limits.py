"""How many flows, listening sockets and learned addresses one guest may cost the host, and what is in use.

A guest is untrusted: every flow it opens may hold a host descriptor, and once the process runs out of
descriptors nothing works any more, not the other flows, not the control socket. So the descriptors the
process has (RLIMIT_NOFILE, raised to the hard limit at start) are shared out in an `FdPool`:

- `reserved`: kept for what is neither a flow nor a listener: the control socket and its clients, the tap or
  qemu's socket, the pcap file, namespace handles, the spare descriptor that lets an accept() shed a
  connection at EMFILE, the splice epoll and the idle sockets pooled in the namespace for splicing (a quarter
  of the reserve at most). A sixteenth of the limit, between `RESERVE_MIN` and `RESERVE_MAX`.
- the rest (`total`) is shared by listening sockets and flows. Listeners (forwarded ports) may take all of
  it but `floor` (`FLOW_FLOOR`, or a quarter when the limit is small) and what flows hold now: `-t all` binds
  until then and reports every port past it as failed, instead of binding until EMFILE. The user asked for
  those ports; what is left is the flows' room. One policy change that asks for more listeners than there
  is room (`-t all -u all` under a small hard limit) shares the room max-min fairly between its listener
  sets (`fair_shares`): each gets what it asked for or an equal part of what is left, so UDP is not left
  without a single port because TCP's range was bound first.
- flows: all together at most the room listeners leave (a TCP, UDP or echo flow holds one descriptor, a
  spliced pair two, a UDP flow on a forwarded port's socket none). Within it, UDP flows take at most half
  and echo flows a sixteenth, so a flood of UDP ports or echo ids always leaves TCP its share.

`FlowTable.add` enforces the flow caps (raising `FlowTableFull` with the cap's name); callers refuse the flow
(RST, ICMP port unreachable, drop) and count the refusal under that name.

Learned guest source addresses are capped per family at `GUEST_ADDRS_MAX`. Once full, new addresses are
ignored rather than evicting old ones: a guest learns its genuine addresses first (DHCP, SLAAC, link-local
at boot), so a later flood of random sources cannot push them out of what the control plane reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

RESERVE_MIN: Final = 64
RESERVE_MAX: Final = 128
FLOW_FLOOR: Final = 256
GUEST_ADDRS_MAX: Final = 32  # per family
UDP_SHARE: Final = 2  # UDP flows: at most 1/UDP_SHARE of the flows' room
ICMP_SHARE: Final = 16


class FdPool:
    """The descriptors listeners and flows share (see the module docstring); plain ints, updated by the
    flow table and the listener sets."""

    __slots__ = ("base", "floor", "flows", "listeners", "open_files", "reserved", "total")

    def __init__(self, open_files: int, reserved: int, total: int, floor: int, base: int = 0) -> None:
        self.open_files = open_files
        self.reserved = reserved
        self.total = total
        self.floor = floor
        self.base = base  # descriptors open before any flow or listener (the interpreter, the loop)
        self.listeners = 0  # held by listening sockets
        self.flows = 0  # held by flows

    def replan(self, open_files: int) -> None:
        """The limit changed under the running process (`prlimit --pid`): share the new one the same way.
        What is held stays held; with a lower limit new flows and listeners are refused until enough went."""
        self.open_files = open_files
        self.reserved, self.total, self.floor = _shares(open_files, self.base)

    def flow_room(self) -> int:
        """Descriptors flows may hold together now."""
        return self.total - self.listeners

    def listener_room(self) -> int:
        """Listening sockets that may still be opened."""
        return max(0, self.total - self.listeners - max(self.flows, self.floor))


def fair_shares(budget: int, wants: Sequence[int]) -> list[int]:
    """Split `budget` between claimants max-min fairly: every claimant gets its want or an equal part of
    what the smaller wants left, whichever is less; a remainder of the division goes to the largest wants."""
    shares = [0] * len(wants)
    left = max(0, budget)
    order = sorted(range(len(wants)), key=lambda i: wants[i])
    for served, index in enumerate(order):
        give = min(max(0, wants[index]), left // (len(order) - served))
        shares[index] = give
        left -= give
    return shares


def _shares(open_files: int, in_use: int) -> tuple[int, int, int]:
    """(reserved, total, floor) of `open_files` descriptors when `in_use` are open before any flow."""
    reserved = max(RESERVE_MIN, min(RESERVE_MAX, open_files // 16))
    total = max(0, open_files - in_use - reserved)
    return reserved, total, min(FLOW_FLOOR, total // 4)


def plan_fd_pool(open_files: int, in_use: int) -> FdPool:
    """Share `open_files` descriptors, `in_use` of which are already open (the interpreter, the loop)."""
    reserved, total, floor = _shares(open_files, in_use)
    return FdPool(open_files, reserved, total, floor, in_use)


@dataclass(frozen=True, slots=True)
class Usage:
    max: int
    used: int


@dataclass(frozen=True, slots=True)
class Limits:
    """What the control plane reports: each cap with its current use, and the refusals so far by cap."""

    open_files: int  # RLIMIT_NOFILE in force
    fds_reserved: int  # kept for the control socket, the tap and the process itself
    flow_fds: Usage  # descriptors held by flows (max: what listeners leave)
    flows: Usage  # flows of every protocol (--max-flows)
    tcp: Usage
    udp: Usage
    icmp: Usage
    listeners: Usage  # listening sockets of forwarded ports (max: open now plus what may still be opened)
    guest_addresses4: Usage  # learned guest source addresses, per family
    guest_addresses6: Usage
    refused: dict[str, int] = field(default_factory=dict)  # "limit.udp_flows" -> count, ...
