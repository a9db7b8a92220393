"""One flow table for every protocol, with O(1) lookup by key and by id, and a bound on its size.

Keys are (protocol, remote address, remote port, guest port); addresses are 16-byte IPv6 form, with IPv4 as
IPv4-mapped IPv6 (::ffff:a.b.c.d), so both families share one key space. For ICMP echo the "ports" are the
guest's echo identifier and 0. The table only indexes flows; each protocol module owns its flows' logic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, TypeAlias

PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMP: Final = 1  # ICMP and ICMPv6 echo share one protocol number in the key space

FlowKey: TypeAlias = tuple[int, bytes, int, int]
_V4_MAPPED: Final = b"\x00" * 10 + b"\xff\xff"


def key_addr(addr: bytes) -> bytes:
    """4- or 16-byte packed address → the 16-byte form used in keys."""
    return _V4_MAPPED + addr if len(addr) == 4 else addr


@dataclass(slots=True, eq=False)
class Flow:
    """Fields every protocol's flow has; subclasses add their state."""

    flow_id: int
    proto: int
    key: FlowKey
    created: float
    last_active: float
    guest_initiated: bool = True
    bytes_from_guest: int = 0
    bytes_to_guest: int = 0
    packets_from_guest: int = 0
    packets_to_guest: int = 0


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """What watchers of the flow table hear: a flow opened, changed state, or closed (with why)."""

    kind: str  # "opened" | "state" | "closed"
    flow: Flow
    state: str
    reason: str = ""  # for "closed": fin, rst_from_guest, rst_from_host, timeout, reset_by_api, limit, ...
    time: float = 0.0


class FlowTableFull(Exception):
    """Raised by `add` at the size bound; the caller refuses the new flow (RST, drop)."""


class FlowTable:
    def __init__(self, max_flows: int = 256 * 1024) -> None:
        self.max_flows = max_flows
        self._by_key: dict[FlowKey, Flow] = {}
        self._by_id: dict[int, Flow] = {}
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._by_id.values()))

    def new_id(self) -> int:
        """Never reused within a process: a stale id from the control plane cannot hit a new flow."""
        flow_id = self._next_id
        self._next_id += 1
        return flow_id

    def add(self, flow: Flow) -> None:
        if len(self._by_id) >= self.max_flows:
            raise FlowTableFull
        self._by_key[flow.key] = flow
        self._by_id[flow.flow_id] = flow

    def get(self, key: FlowKey) -> Flow | None:
        return self._by_key.get(key)

    def by_id(self, flow_id: int) -> Flow | None:
        return self._by_id.get(flow_id)

    def remove(self, flow: Flow) -> None:
        self._by_id.pop(flow.flow_id, None)
        if self._by_key.get(flow.key) is flow:
            del self._by_key[flow.key]
