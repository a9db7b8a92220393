"""UDP flows: one host socket per (guest port, remote address, remote port), replies mapped back.

Guest-initiated flows get their own socket, bound to the guest's source port when the host has it free (so
the remote sees the same port) and connected to the destination, which makes the kernel deliver only that
peer's replies to it. Datagrams arriving on a forwarded host port create host-initiated flows that share the
listening socket; the guest's replies go back out of that same socket with sendto(). The gateway address means
the host's loopback, and DNS sent to a --dns-forward address goes to the host's resolver. A flow is forgotten
after `udp_idle` seconds without traffic either way.

`UdpCore` makes every decision and the shell (io/udp.py) does the system calls:

- which flow a datagram belongs to (the previous datagram's flow first: a stream hits it every time; then the
  flow table), whether a new flow may be opened (family, port 0, the flow caps) and where it goes;
- UDP GSO grouping. The shell says where a tap batch begins and ends (`begin_batch`/`end_batch`). Within a
  batch of several frames, datagrams of one flow and one size (the last may be shorter) are gathered into
  one run, which the shell hands to the kernel in one `sendmsg` with UDP_SEGMENT (UDP GSO, Linux 4.18) at the
  end of the batch or when the run ends. Outside a batch, or in a batch of one frame (request/response), a
  datagram is sent at once. The run's buffer has a fixed size and is written only through a fixed-size
  view, so it can never be resized while the shell holds a view of it; a datagram larger than the buffer is
  never gathered, and a run's bookkeeping changes only once its bytes are in place;
- which flows expired.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.egress import Egress
from passtd.dataplane.core.flowtable import (
    PROTO_UDP,
    Flow,
    FlowKey,
    FlowTable,
    FlowTableFull,
    NamedSocket,
    key_addr,
)
from passtd.dataplane.core.icmp import LOOPBACK4, LOOPBACK6, map_target, remote_as_seen
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.packets.icmp import build_icmp4_packet, build_icmp6_packet
from passtd.dataplane.packets.udp import UdpTemplate, udp_template

DNS_PORT: Final = 53
GSO_MAX_SEGS: Final = 64  # UDP_MAX_SEGMENTS on older kernels (128 since 6.x)
GSO_MAX_BYTES: Final = 65000  # one UDP payload (65507 over IPv4) may not exceed this

# gather() verdicts
GATHERED: Final = 0  # kept in the run
RUN_COMPLETE: Final = 1  # kept, and the run can take no more: send it now
SEND_ALONE: Final = 2  # send this datagram on its own
FLUSH_FIRST: Final = 3  # another run is pending: send it, then offer this datagram again

SockAddr: TypeAlias = tuple[str, int] | tuple[str, int, int, int]  # as sendto() takes and recvfrom() gives
_ICMP_UNREACH = struct.Struct("!BBHI")
ICMP_DEST_UNREACH: Final = 3
ICMP_PORT_UNREACH: Final = 3
ICMPV6_DEST_UNREACH: Final = 1
ICMPV6_PORT_UNREACH: Final = 4
ICMP_ADMIN_PROHIBITED: Final = 13  # RFC 1812 §5.2.7.1: communication administratively prohibited
ICMPV6_ADMIN_PROHIBITED: Final = 1  # RFC 4443 §3.1
EGRESS_DENIED_UDP: Final = "egress.udp"  # admit's reason for a flow the egress rules deny
ICMPV6_QUOTE_MAX: Final = 1280 - 40 - 8  # RFC 4443 §2.4(c): the error must fit the minimum MTU


class DatagramSocket(Protocol):
    """What the shell's flow sockets offer (socket.socket; tests may wrap one)."""

    def fileno(self) -> int: ...

    def send(self, data: bytes | memoryview, /) -> int: ...

    def sendto(self, data: bytes | memoryview, address: SockAddr, /) -> int: ...

    def sendmsg(self, buffers: Sequence[memoryview], ancdata: Sequence[tuple[int, int, bytes]], /) -> int: ...

    def recv_into(self, buffer: memoryview, /) -> int: ...

    def getsockname(self) -> object: ...

    def close(self) -> None: ...


DNS_TLS_PORT: Final = 853  # RFC 7858; passt's is_dns_flow() relays it too


@dataclass(slots=True, eq=False)
class UdpFlow(Flow):
    """target_addr (Flow) is the resolver for DNS; target_port where the host socket sends."""

    v6: bool = False
    target_port: int = 0
    sock: DatagramSocket | None = (
        None  # the shell's socket; shared with the listener for host-initiated flows
    )
    own_sock: bool = True  # False: the socket is a forwarded port's listener, not ours to close
    sock_addr: SockAddr | None = None  # where sendto() goes for a host-initiated flow (as recvfrom gave it)
    to_guest: UdpTemplate | None = None  # headers toward the guest, built on first use
    no_gso: bool = False  # the shell found the route refuses UDP segmentation offload: send one by one
    # -U: a flow from the namespace's loopback to the host's has no guest frames: the host's replies go back
    # through `back` (the namespace-side listening socket) to `back_addr` (the peer as recvfrom gave it).
    back: DatagramSocket | None = None
    back_addr: SockAddr | None = None

    def host_socket(self) -> NamedSocket | None:
        return self.sock


def udp_key(remote: bytes, remote_port: int, guest_port: int) -> FlowKey:
    return (PROTO_UDP, key_addr(remote), remote_port, guest_port)


def target_for(ctx: Context, dst: bytes, dport: int) -> bytes:
    """Where a guest datagram (or connection) to dst:dport really goes on the host: the DNS relay first (passt
    fwd.c fwd_nat_from_tap), then the address mapping."""
    dns_upstream = ctx.dns_upstream
    if dport in (DNS_PORT, DNS_TLS_PORT) and dns_upstream and any(dst == a.packed for a in ctx.dns_forward):
        v6 = len(dst) == 16
        same = [a for a in dns_upstream if (a.version == 6) == v6]
        return (same or list(dns_upstream))[0].packed
    return map_target(ctx, dst)


def new_guest_flow(
    flow_id: int, v6: bool, src: bytes, dst: bytes, sport: int, dport: int, target: bytes, now: float
) -> UdpFlow:
    return UdpFlow(
        flow_id, PROTO_UDP, udp_key(dst, dport, sport), now, now, guest_initiated=True, v6=v6,
        guest_addr=bytes(src), guest_port=sport, remote_addr=bytes(dst), remote_port=dport,
        target_addr=target, target_port=dport,
    )  # fmt: skip


def new_host_flow(
    flow_id: int, guest_addr: bytes, guest_port: int, remote: bytes, peer: bytes, peer_port: int,
    sock: DatagramSocket | None, now: float,
) -> UdpFlow:  # fmt: skip
    return UdpFlow(
        flow_id, PROTO_UDP, udp_key(remote, peer_port, guest_port), now, now, guest_initiated=False,
        v6=len(guest_addr) == 16, guest_addr=guest_addr, guest_port=guest_port, remote_addr=remote,
        remote_port=peer_port, target_addr=peer, target_port=peer_port, sock=sock, own_sock=False, host_fds=0,
    )  # fmt: skip


def guest_template(flow: UdpFlow) -> UdpTemplate:
    """The headers of every datagram toward the guest on this flow: from the address and port it expects."""
    tpl = flow.to_guest
    if tpl is None:
        tpl = flow.to_guest = udp_template(
            flow.remote_addr, flow.guest_addr, flow.remote_port, flow.guest_port
        )
    return tpl


def port_unreachable(
    v6: bool, src: bytes, dst: bytes, sport: int, dport: int, payload: memoryview, prohibited: bool = False
) -> bytes:
    """ICMP/ICMPv6 port unreachable for a guest datagram src:sport → dst:dport we refuse: an IP packet from
    `dst` to the guest, quoting the datagram's headers and, as RFC 792 and RFC 4443 §3.1 ask, the start of it
    (8 bytes for IPv4, as much as fits the minimum MTU for IPv6). The quoted headers are rebuilt, not copied:
    the guest's stack matches its socket by addresses and ports, which they carry unchanged. `prohibited`:
    "communication administratively prohibited" instead (egress rules), which the guest's stack reports as
    EHOSTUNREACH (IPv4) or EACCES (IPv6) on a connected socket."""
    quoted_udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    if v6:
        code = ICMPV6_ADMIN_PROHIBITED if prohibited else ICMPV6_PORT_UNREACH
        body = quoted_udp + bytes(payload[: ICMPV6_QUOTE_MAX - 40 - 8])
        inner = struct.pack("!IHBB", 6 << 28, len(quoted_udp) + len(payload), 17, 64) + src + dst
        message = bytearray(_ICMP_UNREACH.pack(ICMPV6_DEST_UNREACH, code, 0, 0)) + inner + body
        return build_icmp6_packet(dst, src, message, hop_limit=64)
    code = ICMP_ADMIN_PROHIBITED if prohibited else ICMP_PORT_UNREACH
    total = 20 + 8 + len(payload)
    inner = struct.pack("!BBHHHBBH", 0x45, 0, total, 0, 0, 64, 17, 0) + src + dst
    message = bytearray(_ICMP_UNREACH.pack(ICMP_DEST_UNREACH, code, 0, 0)) + inner + quoted_udp
    return build_icmp4_packet(dst, src, message)


class UdpCore:
    """The UDP decisions (see the module docstring); `flows` is the shared flow table."""

    def __init__(
        self,
        ctx: Context,
        flows: FlowTable,
        stats: Stats,
        guest: Guest,
        egress: Egress | None = None,
    ) -> None:
        self.ctx = ctx
        self.egress = egress if egress is not None else Egress()
        self.flows = flows
        self.stats = stats
        self.guest = guest
        self.active: dict[int, UdpFlow] = {}
        self.last: UdpFlow | None = None  # the flow of the previous guest datagram
        self._peer_flows: dict[tuple[int, SockAddr], UdpFlow] = {}  # (guest port, recvfrom address) → flow
        self._peer_keys: dict[int, list[tuple[int, SockAddr]]] = {}  # flow id → its keys above
        self._ns_flows: dict[tuple[int, SockAddr], UdpFlow] = {}  # -U: (port, namespace peer) → flow
        # the run of datagrams gathered for one UDP GSO send: one flow, equal sizes (the last may be shorter)
        self.batching = False
        self.run_flow: UdpFlow | None = None
        self._buf = bytearray(GSO_MAX_BYTES)
        self._view = memoryview(self._buf)  # the only writer of _buf: a view cannot resize what it views
        self.run_len = 0
        self.run_size = 0
        self.run_count = 0

    # -- flow lookup ---------------------------------------------------------------------------------------

    def find(self, src: bytes, dst: bytes, sport: int, dport: int) -> UdpFlow | None:
        """The live flow of a guest datagram, or None (the caller then asks `admit` and opens one)."""
        flow = self.last
        if (
            flow is not None
            and flow.remote_port == dport
            and flow.guest_port == sport
            and flow.remote_addr == dst
            and flow.guest_addr == src
            and flow.sock is not None
        ):
            return flow
        found = self.flows.get(udp_key(dst, dport, sport))
        if isinstance(found, UdpFlow) and found.guest_addr == src and found.sock is not None:
            self.last = found
            return found
        return None

    def admit(self, v6: bool, src: bytes, dst: bytes, sport: int, dport: int, now: float) -> UdpFlow | str:
        """A new guest flow for the shell to open a socket for, or the reason it is refused (counted here;
        a reason starting with "limit." is answered with `port_unreachable`, EGRESS_DENIED_UDP with it too,
        administratively prohibited)."""
        if (v6 and self.ctx.ip6 is None) or (not v6 and self.ctx.ip4 is None):
            return self._refuse("udp.family_disabled")
        if dport == 0:
            return self._refuse("udp.port_zero")
        egress = self.egress
        if egress.policy is not None and not egress.check(PROTO_UDP, v6, src, sport, dst, dport, now):
            return self._refuse(EGRESS_DENIED_UDP)
        refused = self.flows.check(PROTO_UDP)
        if refused:
            return self._refuse(refused)
        target = target_for(self.ctx, bytes(dst), dport)
        return new_guest_flow(self.flows.new_id(), v6, src, dst, sport, dport, target, now)

    def _refuse(self, reason: str) -> str:
        self.stats.drop(reason)
        return reason

    def register(self, flow: UdpFlow, sock: DatagramSocket | None) -> str:
        """A flow whose socket the shell opened (or shares): into the table. "" on success, else the reason
        (counted; the caller closes the socket it opened)."""
        flow.sock = sock
        try:
            self.flows.add(flow)
        except FlowTableFull as exc:
            flow.sock = None
            return self._refuse(exc.reason)
        self.active[flow.flow_id] = flow
        return ""

    def peer_flow(self, guest_port: int, peer: SockAddr) -> UdpFlow | None:
        """The host-initiated flow of a peer on a forwarded port (as recvfrom named it)."""
        flow = self._peer_flows.get((guest_port, peer))
        return flow if flow is not None and flow.sock is not None else None

    def host_flow(
        self, v6: bool, packed: bytes, peer: SockAddr, guest_port: int, sock: DatagramSocket, now: float,
        target: bytes = b"",
    ) -> tuple[UdpFlow, bool] | None:  # fmt: skip
        """A datagram from a new peer on a forwarded port: its flow toward the guest (sharing `sock`) and
        whether it is new, or None when refused (counted). `target`, the forwarding rule's target address
        (packed), replaces the guest's address when it is of the peer's family."""
        net = self.ctx.ip6 if v6 else self.ctx.ip4
        if net is None:
            self._refuse("udp.family_disabled")
            return None
        peer_port = peer[1]
        remote = remote_as_seen(self.ctx, packed)
        found = self.flows.get(udp_key(remote, peer_port, guest_port))
        flow: UdpFlow
        new = False
        if isinstance(found, UdpFlow) and found.sock is not None:
            flow = found
        else:
            new = True
            seen = [a for a in (self.guest.addrs6 if v6 else self.guest.addrs4) if not a.is_link_local]
            guest_addr = (seen[-1] if seen else net.addr).packed
            if len(target) == (16 if v6 else 4):
                guest_addr = target
            flow = new_host_flow(
                self.flows.new_id(), guest_addr, guest_port, remote, packed, peer_port, None, now
            )
            flow.sock_addr = peer
            if self.register(flow, sock):  # refused: the reason is counted
                return None
        key = (guest_port, peer)
        self._peer_flows[key] = flow
        self._peer_keys.setdefault(flow.flow_id, []).append(key)
        return flow, new

    def ns_flow(self, port: int, peer: SockAddr) -> UdpFlow | None:
        """-U: the flow of a namespace peer sending to `port` on the namespace's loopback."""
        flow = self._ns_flows.get((port, peer))
        return flow if flow is not None and flow.sock is not None else None

    def new_ns_flow(
        self, port: int, back: DatagramSocket, peer: SockAddr, v6: bool, loopback: bytes, peer_addr: bytes,
        now: float,
    ) -> UdpFlow | str:  # fmt: skip
        """-U: a flow for a new namespace peer, for the shell to open its host-loopback socket."""
        refused = self.flows.check(PROTO_UDP)
        if refused:
            return self._refuse(refused)
        return UdpFlow(
            self.flows.new_id(), PROTO_UDP, (PROTO_UDP, key_addr(peer_addr), peer[1], -port), now, now,
            guest_initiated=True, v6=v6, guest_addr=peer_addr, guest_port=peer[1], remote_addr=loopback,
            remote_port=port, target_addr=loopback, target_port=port, back=back, back_addr=peer,
        )  # fmt: skip

    def ns_registered(self, flow: UdpFlow) -> None:
        if flow.back_addr is not None:
            self._ns_flows[(flow.target_port, flow.back_addr)] = flow

    # -- lifetime ------------------------------------------------------------------------------------------

    def expired(self, now: float, idle: float) -> list[UdpFlow]:
        return [f for f in self.active.values() if now - f.last_active > idle]

    def forget(self, flow: UdpFlow) -> None:
        """Drop every reference to a closing flow (the shell has sent its run and closes its socket)."""
        if self.last is flow:
            self.last = None
        if self.run_flow is flow:
            self.run_flow = None
        self.active.pop(flow.flow_id, None)
        if flow.back_addr is not None and self._ns_flows.get((flow.target_port, flow.back_addr)) is flow:
            del self._ns_flows[(flow.target_port, flow.back_addr)]
        for key in self._peer_keys.pop(flow.flow_id, ()):
            if self._peer_flows.get(key) is flow:
                del self._peer_flows[key]
        self.flows.remove(flow)

    def has_peers(self) -> bool:
        return bool(self._peer_flows or self._peer_keys)

    # -- UDP GSO grouping ----------------------------------------------------------------------------------

    def begin_batch(self, frames: int) -> None:
        """A tap batch of `frames` frames starts: with more than one, datagrams may be gathered."""
        self.batching = frames > 1

    def end_batch(self) -> None:
        """The batch ended; the shell sent the pending run first (`take_run`)."""
        self.batching = False

    def gather(self, flow: UdpFlow, payload: memoryview) -> int:
        """What to do with a guest datagram of `flow` (which owns its socket): GATHERED, RUN_COMPLETE,
        SEND_ALONE or FLUSH_FIRST."""
        n = len(payload)
        run = self.run_flow
        if run is not None:
            end = self.run_len + n
            if run is flow and 0 < n <= self.run_size and end <= GSO_MAX_BYTES:
                self._view[self.run_len : end] = payload
                self.run_len = end
                self.run_count += 1
                if n < self.run_size or self.run_count >= GSO_MAX_SEGS:
                    return RUN_COMPLETE  # a shorter datagram can only be the last segment
                return GATHERED
            return FLUSH_FIRST  # another flow or a bigger datagram: the run goes first
        if not self.batching or n == 0 or n > GSO_MAX_BYTES or flow.no_gso:
            return SEND_ALONE
        self._view[:n] = payload
        self.run_len = self.run_size = n
        self.run_count = 1
        self.run_flow = flow  # last: the run exists only once its bytes are in place
        return GATHERED

    def take_run(self) -> tuple[UdpFlow, memoryview, int, int] | None:
        """The pending run (flow, bytes, segment size, datagrams), now no longer pending; the view is valid
        until the next `gather`."""
        flow = self.run_flow
        if flow is None:
            return None
        self.run_flow = None
        return flow, self._view[: self.run_len], self.run_size, self.run_count


def segments(data: memoryview, size: int) -> Sequence[memoryview]:
    """A run cut back into its datagrams (for a route that refuses segmentation offload)."""
    return [data[off : off + size] for off in range(0, len(data), size)]


__all__ = ["LOOPBACK4", "LOOPBACK6", "UdpFlow", "remote_as_seen"]
