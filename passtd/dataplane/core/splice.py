"""Flows that never cross the tap: loopback-to-loopback TCP joined socket to socket (see io/splice.py)."""

from __future__ import annotations

from typing import Protocol

from passtd.dataplane.core.flowtable import Flow, FlowKey


class SplicePair(Protocol):
    """The shell's joined pair of sockets (io/splice.py SplicedPair): bytes relayed each way, and a reset."""

    bytes_ab: int  # accepted side → connected side
    bytes_ba: int

    def reset(self) -> None: ...


class SpliceFlow(Flow):
    """guest_* is the namespace-side endpoint, remote_* the host-side one, as for tap flows. A plain class
    with an explicit __init__: a dataclass's generated one runs interpreted, once per spliced connection."""

    __slots__ = ("pair", "v6")

    v6: bool
    pair: SplicePair | None  # once both sockets are connected (host_fds is 2: both sockets)

    def __init__(
        self,
        flow_id: int,
        proto: int,
        key: FlowKey,
        created: float,
        last_active: float,
        *,
        guest_initiated: bool = True,
        host_fds: int = 2,
        v6: bool = False,
        guest_addr: bytes = b"",
        guest_port: int = 0,
        remote_addr: bytes = b"",
        remote_port: int = 0,
    ) -> None:
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
        self.host_fds = host_fds
        self.guest_addr = guest_addr
        self.guest_port = guest_port
        self.remote_addr = remote_addr
        self.remote_port = remote_port
        self.target_addr = b""
        self.tally = None
        self.v6 = v6
        self.pair = None

    def byte_counts(self) -> tuple[int, int]:
        """While the pair relays, its counters: the accepted side is the guest's for -T (guest-initiated),
        the host client's for a forwarded port."""
        pair = self.pair
        if pair is None:
            return self.bytes_from_guest, self.bytes_to_guest
        if self.guest_initiated:
            return pair.bytes_ba, pair.bytes_ab
        return pair.bytes_ab, pair.bytes_ba
