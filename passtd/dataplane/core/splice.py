"""Flows that never cross the tap: loopback-to-loopback TCP joined socket to socket (see io/splice.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from passtd.dataplane.core.flowtable import Flow


@dataclass(slots=True, eq=False)
class SpliceFlow(Flow):
    """guest_* is the namespace-side endpoint, remote_* the host-side one, as for tap flows."""

    v6: bool = False
    guest_addr: bytes = b""
    guest_port: int = 0
    remote_addr: bytes = b""
    remote_port: int = 0
    pair: Any = None  # the shell's SplicedPair, once both sockets are connected
