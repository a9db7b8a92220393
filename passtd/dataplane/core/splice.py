"""Flows that never cross the tap: loopback-to-loopback TCP joined socket to socket (see io/splice.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from passtd.dataplane.core.flowtable import Flow


class SplicePair(Protocol):
    """The shell's joined pair of sockets (io/splice.py SplicedPair): bytes relayed each way, and a reset."""

    bytes_ab: int  # accepted side → connected side
    bytes_ba: int

    def reset(self) -> None: ...


@dataclass(slots=True, eq=False)
class SpliceFlow(Flow):
    """guest_* is the namespace-side endpoint, remote_* the host-side one, as for tap flows."""

    v6: bool = False
    pair: SplicePair | None = None  # once both sockets are connected (host_fds is 2: both sockets)
