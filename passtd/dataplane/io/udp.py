"""UDP sockets for the UDP flows of core/udp.py: open, bind, relay, expire."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.flowtable import Flow, FlowTable, FlowTableFull
from passtd.dataplane.core.fwd import Listener
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.udp import (
    UdpFlow,
    datagram_to_guest,
    new_guest_flow,
    new_host_flow,
    remote_as_seen,
    target_for,
    udp_key,
)
from passtd.dataplane.io.sockets import sockaddr
from passtd.dataplane.packets.udp import UdpHeader

RECV_SIZE: Final = 65536
BATCH: Final = 64


class UdpRelay:
    def __init__(
        self,
        ctx: Context,
        loop: asyncio.AbstractEventLoop,
        flows: FlowTable,
        stats: Stats,
        guest: Guest,
        to_tap: Callable[[int, bytes], None],
        after_batch: Callable[[float], None],
        emit: Callable[[str, Flow, str, str], None],
        log: Any,
        dns_forward: tuple[IPv4Address | IPv6Address, ...] = (),
        dns_upstream: tuple[IPv4Address | IPv6Address, ...] = (),
    ) -> None:
        self.ctx = ctx
        self.loop = loop
        self.flows = flows
        self.stats = stats
        self.guest = guest
        self.to_tap = to_tap
        self.after_batch = after_batch
        self.emit = emit
        self.log = log
        self.dns_forward = dns_forward
        self.dns_upstream = dns_upstream
        self.active: dict[int, UdpFlow] = {}

    # -- guest → host -------------------------------------------------------------------------------------

    def from_guest(self, v6: bool, src: bytes, dst: bytes, udp: UdpHeader, now: float) -> None:
        if (v6 and self.ctx.ip6 is None) or (not v6 and self.ctx.ip4 is None):
            self.stats.drop("udp.family_disabled")
            return
        flow = self.flows.get(udp_key(dst, udp.dport, udp.sport))
        if not isinstance(flow, UdpFlow) or flow.guest_addr != src:
            if udp.dport == 0:
                self.stats.drop("udp.port_zero")
                return
            flow = self._open(v6, src, dst, udp.sport, udp.dport, now)
            if flow is None:
                return
        flow.last_active = now
        flow.packets_from_guest += 1
        flow.bytes_from_guest += len(udp.payload)
        try:
            if flow.own_sock:
                flow.sock.send(udp.payload)
            else:
                flow.sock.sendto(udp.payload, sockaddr(flow.target_addr, flow.target_port))
        except (BlockingIOError, InterruptedError):
            self.stats.drop("udp.send_would_block")
        except OSError as exc:
            self.stats.drop("udp.send_error")
            self.log.debug("udp.send.failed", flow_id=flow.flow_id, error=exc.strerror)

    def _open(self, v6: bool, src: bytes, dst: bytes, sport: int, dport: int, now: float) -> UdpFlow | None:
        target = target_for(self.ctx, bytes(dst), dport, self.dns_forward, self.dns_upstream)
        flow = new_guest_flow(self.flows.new_id(), v6, src, dst, sport, dport, target, now)
        family = socket.AF_INET6 if len(target) == 16 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            any_addr = "::" if family == socket.AF_INET6 else "0.0.0.0"
            try:
                sock.bind((any_addr, sport))  # the remote sees the guest's own port when the host has it free
            except OSError:
                sock.bind((any_addr, 0))
            sock.connect(sockaddr(target, dport))
        except OSError as exc:
            sock.close()
            self.stats.drop("udp.socket_error")
            self.log.debug("udp.flow.open_failed", error=exc.strerror)
            return None
        flow.sock = sock
        try:
            self.flows.add(flow)
        except FlowTableFull:
            sock.close()
            self.stats.drop("flow.table_full")
            return None
        self.active[flow.flow_id] = flow
        self.loop.add_reader(sock.fileno(), self._on_flow_readable, flow)
        self.emit("opened", flow, "ACTIVE", "")
        return flow

    def _on_flow_readable(self, flow: UdpFlow) -> None:
        now = self.loop.time()
        sock = flow.sock
        for _ in range(BATCH):
            try:
                data = sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP errors (port unreachable) queued on the connected socket
                if exc.errno != errno.ECONNREFUSED:
                    self.log.debug("udp.recv.failed", flow_id=flow.flow_id, error=exc.strerror)
                continue
            self.to_tap(*datagram_to_guest(flow, data, now))
        self.after_batch(now)

    # -- host → guest (forwarded ports) ---------------------------------------------------------------------

    def on_listener(self, listener: Listener, sock: socket.socket) -> None:
        now = self.loop.time()
        for _ in range(BATCH):
            try:
                data, peer = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            v6 = sock.family == socket.AF_INET6
            packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, peer[0])
            if v6 and packed[:12] == bytes(10) + b"\xff\xff":
                packed, v6 = packed[12:], False
            flow = self._host_flow(packed, peer[1], listener.target_port, sock, now)
            if flow is not None:
                self.to_tap(*datagram_to_guest(flow, data, now))
        self.after_batch(now)

    def _host_flow(
        self, peer: bytes, peer_port: int, guest_port: int, sock: socket.socket, now: float
    ) -> UdpFlow | None:
        v6 = len(peer) == 16
        net = self.ctx.ip6 if v6 else self.ctx.ip4
        if net is None:
            self.stats.drop("udp.family_disabled")
            return None
        remote = remote_as_seen(self.ctx, peer)
        flow = self.flows.get(udp_key(remote, peer_port, guest_port))
        if isinstance(flow, UdpFlow):
            return flow
        seen = [a for a in (self.guest.addrs6 if v6 else self.guest.addrs4) if not a.is_link_local]
        guest_addr = (seen[-1] if seen else net.addr).packed
        flow = new_host_flow(self.flows.new_id(), guest_addr, guest_port, remote, peer, peer_port, sock, now)
        try:
            self.flows.add(flow)
        except FlowTableFull:
            self.stats.drop("flow.table_full")
            return None
        self.active[flow.flow_id] = flow
        self.emit("opened", flow, "ACTIVE", "")
        return flow

    # -- lifetime ------------------------------------------------------------------------------------------

    def expire(self, now: float, idle: float) -> None:
        for flow in [f for f in self.active.values() if now - f.last_active > idle]:
            self.close_flow(flow, "timeout")

    def close_flow(self, flow: UdpFlow, reason: str) -> None:
        self.active.pop(flow.flow_id, None)
        self.flows.remove(flow)
        if flow.own_sock and flow.sock is not None:
            try:
                self.loop.remove_reader(flow.sock.fileno())
            except (ValueError, OSError):
                pass
            flow.sock.close()
        flow.sock = None
        self.emit("closed", flow, "CLOSED", reason)

    def close(self) -> None:
        for flow in list(self.active.values()):
            self.close_flow(flow, "shutdown")
