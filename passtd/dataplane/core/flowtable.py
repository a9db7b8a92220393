"""One flow table for every protocol, with O(1) lookup by key and by id, and a bound on its size.

Keys are (protocol, remote address, remote port, guest port); addresses are 16-byte IPv6 form, with IPv4 as
IPv4-mapped IPv6 (::ffff:a.b.c.d), so both families share one key space. For ICMP echo the "ports" are the
guest's echo identifier and 0. The table only indexes flows; each protocol module owns its flows' logic.

It also enforces the limits of core/limits.py: a cap on the flows of each protocol, on all flows, and on the
host descriptors they hold together (`Flow.host_fds`). `add` raises `FlowTableFull` naming the cap reached;
the caller refuses the flow (RST, ICMP unreachable, drop) and counts it under that name.

The two sides of a flow are typed fields of the base `Flow`, filled the same way by every protocol when the
flow is created, so the control views read fields and never probe for attributes:
- guest side: `guest_addr`, `guest_port` (the guest's own endpoint; for ICMP echo the port is the echo
  identifier);
- remote as the guest sees it: `remote_addr`, `remote_port` (the gateway address for the host's loopback; 0
  for echo);
- host side: `target_addr` (where the host socket sends or connects: loopback for the gateway, the resolver
  for DNS), and the host socket itself through `host_socket()`, whose local name the io layer reads on demand
  (io/sockets.py `local_name`: a system call, so only a control view asks, never the per-frame path).
Addresses are packed, 4 or 16 bytes by family (keys use the 16-byte form of `key_addr`). A splice flow's
guest side is the namespace's end of the pair. Plain slots rather than a `Side` object per side: no extra
object per flow and no extra indirection on the per-frame path, which reads them. The host socket's local
name is asked for, not stored: a getsockname() per connection would cost the connection rate, and a UDP
socket's name is only fixed by its first send.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

from passtd.dataplane.core.limits import ICMP_SHARE, UDP_SHARE, FdPool

PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMP: Final = 1  # ICMP and ICMPv6 echo share one protocol number in the key space

FlowKey: TypeAlias = tuple[int, bytes, int, int]
V4_MAPPED: Final = b"\x00" * 10 + b"\xff\xff"  # the prefix of IPv4-mapped IPv6 (::ffff:a.b.c.d)


def key_addr(addr: bytes) -> bytes:
    """4- or 16-byte packed address → the 16-byte form used in keys."""
    return V4_MAPPED + addr if len(addr) == 4 else addr


def unmap(addr: bytes) -> bytes:
    """IPv4-mapped IPv6 (16 bytes) → the 4-byte IPv4 address; anything else unchanged."""
    return addr[12:] if len(addr) == 16 and addr[:12] == V4_MAPPED else addr


class NamedSocket(Protocol):
    """A flow's host socket as the control views see it: it can tell its local name (io/sockets.py
    `local_name` reads it)."""

    def getsockname(self) -> object: ...


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
    host_fds: int = 1  # descriptors the flow holds (a spliced pair 2, a flow on a forwarded port's socket 0)
    # The two sides (see the module's docstring).
    guest_addr: bytes = b""
    guest_port: int = 0  # ICMP echo: the guest's echo identifier
    remote_addr: bytes = b""  # as the guest sees it (the gateway for the host's loopback)
    remote_port: int = 0
    target_addr: bytes = b""  # where the host socket sends or connects (loopback for the gateway)
    tally: FwdTally | None = None  # the forwarding rule this flow came in through (per-rule counters)

    def host_socket(self) -> NamedSocket | None:
        """The host socket whose local name the views show; None when the flow has none of its own."""
        return None

    def byte_counts(self) -> tuple[int, int]:
        """(from guest, to guest) now (a spliced pair counts in its sockets until it closes)."""
        return self.bytes_from_guest, self.bytes_to_guest


# How a flow's byte counters map onto its rule's: in (from the client of the forwarded port toward its
# target) and out (back). UDP datagrams in are counted on the listening socket itself, so those flows
# bring only their replies (out).
IN_TO_GUEST: Final = 0
IN_FROM_GUEST: Final = 1
OUT_FROM_GUEST: Final = 2
OUT_TO_GUEST: Final = 3


class FwdTally:
    """Counters of one forwarding rule: connections (TCP), datagrams (UDP, in), bytes in and out.

    Flows that came in through the rule are attached while they live; `FlowTable.remove` retires them into
    the totals, so a rule's bytes are its closed flows' plus its live flows' (read by `snapshot`).
    """

    __slots__ = ("bytes_in", "bytes_out", "connections", "datagrams", "live")

    def __init__(self) -> None:
        self.connections = 0
        self.datagrams = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.live: dict[int, tuple[Flow, int]] = {}

    def attach(self, flow: Flow, how: int) -> None:
        """`flow` came in through this rule; `how` is one of IN_TO_GUEST ... OUT_TO_GUEST."""
        flow.tally = self
        self.live[flow.flow_id] = (flow, how)

    def retire(self, flow: Flow) -> None:
        entry = self.live.pop(flow.flow_id, None)
        if entry is not None:
            got_in, got_out = split_bytes(entry[1], flow.bytes_from_guest, flow.bytes_to_guest)
            self.bytes_in += got_in
            self.bytes_out += got_out

    def snapshot(self) -> tuple[int, int, int, int]:
        """(connections, datagrams, bytes in, bytes out) now, the live flows' bytes included."""
        got_in, got_out = self.bytes_in, self.bytes_out
        for flow, how in self.live.values():
            a, b = split_bytes(how, *flow.byte_counts())
            got_in += a
            got_out += b
        return (self.connections, self.datagrams, got_in, got_out)


def split_bytes(how: int, from_guest: int, to_guest: int) -> tuple[int, int]:
    """A flow's (from guest, to guest) bytes as its rule's (in, out)."""
    if how == IN_TO_GUEST:
        return (to_guest, from_guest)
    if how == IN_FROM_GUEST:
        return (from_guest, to_guest)
    if how == OUT_FROM_GUEST:
        return (0, from_guest)
    return (0, to_guest)


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """What watchers of the flow table hear: a flow opened, changed state, or closed (with why)."""

    kind: str  # "opened" | "state" | "closed"
    flow: Flow
    state: str
    reason: str = ""  # for "closed": fin, rst_from_guest, rst_from_host, timeout, reset_by_api, limit, ...
    time: float = 0.0


class FlowTableFull(Exception):
    """Raised by `add` at a cap; the caller refuses the new flow (RST, ICMP unreachable, drop) and counts
    `reason`: limit.flows, limit.fds, or limit.<proto>_flows."""

    def __init__(self, reason: str = "limit.flows") -> None:
        super().__init__(reason)
        self.reason = reason


_CAP_NAMES: Final = {
    PROTO_TCP: "limit.tcp_flows",
    PROTO_UDP: "limit.udp_flows",
    PROTO_ICMP: "limit.icmp_flows",
}
_SHARES: Final = {PROTO_UDP: UDP_SHARE, PROTO_ICMP: ICMP_SHARE}
UNLIMITED: Final = 1 << 62


class FlowTable:
    def __init__(self, max_flows: int = 256 * 1024, pool: FdPool | None = None) -> None:
        self.max_flows = max_flows
        self._by_key: dict[FlowKey, Flow] = {}
        self._by_id: dict[int, Flow] = {}
        self._next_id = 1
        self.pool = pool  # None: no descriptor limit (tests of pure logic)
        self.caps: dict[int, int] = {}  # protocol -> most flows, overriding the pool's shares
        self.counts: dict[int, int] = {PROTO_TCP: 0, PROTO_UDP: 0, PROTO_ICMP: 0}
        self.fds = 0  # host descriptors held by the flows in the table
        self.refused: dict[str, int] = {}  # cap name -> refusals

    def set_cap(self, proto: int, cap: int) -> None:
        self.caps[proto] = cap

    @property
    def max_fds(self) -> int:
        """Descriptors the flows may hold together now: what the listeners leave of the pool."""
        pool = self.pool
        return UNLIMITED if pool is None else pool.flow_room()

    def cap(self, proto: int) -> int:
        """Most flows of `proto` now: the override, else its share of the flows' room (at most max_flows)."""
        cap = self.caps.get(proto)
        if cap is None:
            cap = self.max_fds // _SHARES.get(proto, 1)
        return min(cap, self.max_flows)

    def count(self, proto: int) -> int:
        return self.counts.get(proto, 0)

    def check(self, proto: int, host_fds: int = 1) -> str:
        """ "" when `add` would take one more flow of `proto` holding `host_fds` descriptors; else the name
        of the cap it would pass, counted as a refusal. Asked before opening a socket for a new flow."""
        if len(self._by_id) >= self.max_flows:
            reason = "limit.flows"
        elif self.counts.get(proto, 0) >= self.cap(proto):
            reason = _CAP_NAMES.get(proto, "limit.flows")
        elif self.fds + host_fds > self.max_fds:
            reason = "limit.fds"
        else:
            return ""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return reason

    def _held(self, delta: int) -> None:
        self.fds += delta
        if self.pool is not None:
            self.pool.flows = self.fds

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
        if self._by_id.get(flow.flow_id) is flow:  # already in: only its key is indexed again
            self._by_key[flow.key] = flow
            return
        proto = flow.proto
        reason = self.check(proto, flow.host_fds)
        if reason:
            raise FlowTableFull(reason)
        self.counts[proto] = self.counts.get(proto, 0) + 1
        self._held(flow.host_fds)
        self._by_key[flow.key] = flow
        self._by_id[flow.flow_id] = flow

    def replace(self, old: Flow, new: Flow) -> None:
        """`new` takes `old`'s place (and key) whatever the caps: the count does not change. For a flow that
        takes another's key over (an echo id reused from another guest source)."""
        self.remove(old)
        self.counts[new.proto] = self.counts.get(new.proto, 0) + 1
        self._held(new.host_fds)
        self._by_key[new.key] = new
        self._by_id[new.flow_id] = new

    def get(self, key: FlowKey) -> Flow | None:
        return self._by_key.get(key)

    def by_id(self, flow_id: int) -> Flow | None:
        return self._by_id.get(flow_id)

    def remove(self, flow: Flow) -> None:
        if self._by_id.get(flow.flow_id) is flow:
            del self._by_id[flow.flow_id]
            if flow.tally is not None:
                flow.tally.retire(flow)
            self.counts[flow.proto] = self.counts.get(flow.proto, 1) - 1
            self._held(-flow.host_fds)
        if self._by_key.get(flow.key) is flow:
            del self._by_key[flow.key]
