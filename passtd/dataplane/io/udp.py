"""UDP sockets for the UDP flows of core/udp.py: open, bind, relay, expire.

Per datagram, both directions stay lean, since everything shares one CPU with the guest and its peers:

- Guest → host: the last flow is checked before the flow table (a stream hits it every time). A datagram
  that arrives within `BURST_GAP` of the previous one is part of a tap batch: datagrams of one flow and one
  size are then gathered and handed to the kernel in one `sendmsg` with UDP_SEGMENT (UDP GSO, Linux 4.18),
  which cuts them into the same datagrams at a fraction of the per-send cost. What is gathered is sent at
  the end of the callback (`call_soon`), before any other frame is read. A lone datagram (request/response)
  is sent at once. A route that refuses segmentation (EIO/EINVAL) turns it off for that flow.
- Host → guest: many datagrams per readiness event, read into one preallocated buffer; the IP and UDP
  headers come from the flow's template; `to_tap` copies the payload once into the frame.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from time import perf_counter
from typing import Any, Final, Protocol

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.flowtable import PROTO_UDP, Flow, FlowTable, FlowTableFull, key_addr
from passtd.dataplane.core.fwd import Listener
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.udp import (
    UdpFlow,
    guest_template,
    new_guest_flow,
    new_host_flow,
    remote_as_seen,
    target_for,
    udp_key,
)
from passtd.dataplane.io.sockets import Outbound, sockaddr
from passtd.dataplane.packets.ethernet import ETH_P_IP, ETH_P_IPV6
from passtd.dataplane.packets.udp import (
    UdpHeader,
    udp_headers,
    udp_headers_partial,
    udp_offload_vnet_header,
)

RECV_SIZE: Final = 65536
BATCH: Final = 64
SOCK_BUF: Final = 4 << 20  # SO_RCVBUF/SO_SNDBUF asked for on flow sockets (the kernel caps it unless root)
BURST_GAP: Final = 20e-6  # seconds: guest datagrams closer than this came in one tap batch
GSO_MAX_SEGS: Final = 64  # UDP_MAX_SEGMENTS on older kernels (128 since 6.x)
GSO_MAX_BYTES: Final = 65000  # one UDP payload (65507 over IPv4) may not exceed this
UDP_SEGMENT: Final = 103  # linux/udp.h: setsockopt/cmsg level SOL_UDP
SOL_UDP: Final = 17
SO_SNDBUFFORCE: Final = 32  # asm-generic/socket.h; Python's socket module does not name them
SO_RCVBUFFORCE: Final = 33
_U16 = struct.Struct("=H")  # the cmsg carries the segment size in host byte order


class ToTap(Protocol):
    """The dataplane's frame collector: `payload` follows `packet` and is copied (its buffer is reused)."""

    def __call__(
        self, ethertype: int, packet: bytes, offload: int = -1, payload: bytes | memoryview = b""
    ) -> None: ...


# Optional: collect a frame that carries its own virtio-net header (tap with IFF_VNET_HDR). With it, frames
# toward the guest leave the UDP checksum to the kernel (NEEDS_CSUM). Arguments: vnet header, ethertype,
# IP+UDP headers, payload (copied, like `ToTap`).
ToTapVnet = Callable[[bytes, int, bytes, memoryview], None]


def _tune(sock: socket.socket) -> None:
    """Room for a burst either way; SO_*BUFFORCE (CAP_NET_ADMIN) passes the sysctl caps, as pasta does."""
    for force, plain in (
        (SO_RCVBUFFORCE, socket.SO_RCVBUF),
        (SO_SNDBUFFORCE, socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCK_BUF)
            except OSError:
                pass


class UdpRelay:
    def __init__(
        self,
        ctx: Context,
        loop: asyncio.AbstractEventLoop,
        flows: FlowTable,
        stats: Stats,
        guest: Guest,
        to_tap: ToTap,
        after_batch: Callable[[float], None],
        emit: Callable[[str, Flow, str, str], None],
        log: Any,
        dns_forward: tuple[IPv4Address | IPv6Address, ...] = (),
        dns_upstream: tuple[IPv4Address | IPv6Address, ...] = (),
        to_tap_vnet: ToTapVnet | None = None,
    ) -> None:
        self.ctx = ctx
        self.loop = loop
        self.flows = flows
        self.stats = stats
        self.guest = guest
        self.to_tap = to_tap
        self.to_tap_vnet = to_tap_vnet
        self.after_batch = after_batch
        self.emit = emit
        self.log = log
        self.dns_forward = dns_forward
        self.dns_upstream = dns_upstream
        self.active: dict[int, UdpFlow] = {}
        self._vnet4 = udp_offload_vnet_header(False)
        self._vnet6 = udp_offload_vnet_header(True)
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._last: UdpFlow | None = None  # the flow of the previous guest datagram
        self._last_t = 0.0
        self.burst_gap = BURST_GAP
        self.gso_sends = 0  # sendmsg calls that carried several datagrams (plain ints: read by tests, status)
        self.gso_datagrams = 0
        # datagrams gathered for one UDP GSO send: one flow, equal sizes (the last may be shorter)
        self._gso_flow: UdpFlow | None = None
        self._gso_buf = bytearray(GSO_MAX_BYTES)
        self._gso_view = memoryview(self._gso_buf)
        self._gso_len = 0
        self._gso_size = 0
        self._gso_count = 0
        self._gso_scheduled = False
        self.outbound = Outbound()  # --outbound source addresses
        self._ns_flows: dict[tuple[int, Any], UdpFlow] = {}  # -U: (port, namespace peer) → flow
        self._peer_flows: dict[tuple[int, Any], UdpFlow] = {}  # (guest port, recvfrom address) → flow
        self._peer_keys: dict[int, list[tuple[int, Any]]] = {}  # flow id → its keys above

    # -- guest → host -------------------------------------------------------------------------------------

    def from_guest(self, v6: bool, src: bytes, dst: bytes, udp: UdpHeader, now: float) -> None:
        sport, dport, _length, payload = udp
        flow = self._last
        if (
            flow is None
            or flow.remote_port != dport
            or flow.guest_port != sport
            or flow.remote_addr != dst
            or flow.guest_addr != src
            or flow.sock is None
        ):
            flow = self._lookup(v6, src, dst, sport, dport, now)
            if flow is None:
                return
            self._last = flow
        n = len(payload)
        flow.last_active = now
        flow.packets_from_guest += 1
        flow.bytes_from_guest += n
        if not flow.own_sock:
            try:
                flow.sock.sendto(payload, flow.sock_addr)
            except OSError as exc:
                self._send_failed(flow, exc, 1)
            return
        t = perf_counter()
        burst = t - self._last_t < self.burst_gap
        self._last_t = t
        gathered = self._gso_flow
        if gathered is not None:
            if gathered is flow and 0 < n <= self._gso_size and self._gso_len + n <= GSO_MAX_BYTES:
                end = self._gso_len + n
                self._gso_buf[self._gso_len : end] = payload
                self._gso_len = end
                self._gso_count += 1
                if n < self._gso_size or self._gso_count >= GSO_MAX_SEGS:
                    self.flush_to_host()  # a shorter datagram can only be the last segment
                return
            self.flush_to_host()  # another flow or a bigger datagram: what was gathered goes first
        if burst and n and not flow.no_gso:
            self._gso_flow = flow
            self._gso_buf[:n] = payload
            self._gso_len = self._gso_size = n
            self._gso_count = 1
            if not self._gso_scheduled:
                self._gso_scheduled = True
                self.loop.call_soon(self._flush_scheduled)
            return
        try:
            flow.sock.send(payload)
        except OSError as exc:
            self._send_failed(flow, exc, 1)

    def _flush_scheduled(self) -> None:
        self._gso_scheduled = False
        self.flush_to_host()

    def flush_to_host(self) -> None:
        """Send the gathered datagrams, as one UDP GSO send when there are several."""
        flow = self._gso_flow
        if flow is None:
            return
        self._gso_flow = None
        count = self._gso_count
        data = self._gso_view[: self._gso_len]
        sock = flow.sock
        if sock is None:  # closed meanwhile
            return
        try:
            if count == 1:
                sock.send(data)
            else:
                sock.sendmsg((data,), ((SOL_UDP, UDP_SEGMENT, _U16.pack(self._gso_size)),))
                self.gso_sends += 1
                self.gso_datagrams += count
        except OSError as exc:
            if count > 1 and exc.errno in (errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT):
                flow.no_gso = True  # no checksum offload or segmentation on this route: one by one
                self.log.debug("udp.gso.disabled", flow_id=flow.flow_id, error=exc.strerror)
                size = self._gso_size
                for off in range(0, len(data), size):
                    try:
                        sock.send(data[off : off + size])
                    except OSError as exc2:
                        self._send_failed(flow, exc2, 1)
                return
            self._send_failed(flow, exc, count)

    def _send_failed(self, flow: UdpFlow, exc: OSError, count: int) -> None:
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            self.stats.dropped["udp.send_would_block"] += count
            return
        self.stats.dropped["udp.send_error"] += count
        self.log.debug("udp.send.failed", flow_id=flow.flow_id, error=exc.strerror)

    def _lookup(self, v6: bool, src: bytes, dst: bytes, sport: int, dport: int, now: float) -> UdpFlow | None:
        if (v6 and self.ctx.ip6 is None) or (not v6 and self.ctx.ip4 is None):
            self.stats.drop("udp.family_disabled")
            return None
        flow = self.flows.get(udp_key(dst, dport, sport))
        if isinstance(flow, UdpFlow) and flow.guest_addr == src and flow.sock is not None:
            return flow
        if dport == 0:
            self.stats.drop("udp.port_zero")
            return None
        return self._open(v6, src, dst, sport, dport, now)

    def _open(self, v6: bool, src: bytes, dst: bytes, sport: int, dport: int, now: float) -> UdpFlow | None:
        target = target_for(self.ctx, bytes(dst), dport, self.dns_forward, self.dns_upstream)
        flow = new_guest_flow(self.flows.new_id(), v6, src, dst, sport, dport, target, now)
        family = socket.AF_INET6 if len(target) == 16 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.outbound.bind_device(sock, target)
            source = self.outbound.source(target) or ("::" if family == socket.AF_INET6 else "0.0.0.0")
            try:
                sock.bind((source, sport))  # the remote sees the guest's own port when the host has it free
            except OSError:
                sock.bind((source, 0))
            sock.connect(sockaddr(target, dport))
        except OSError as exc:
            sock.close()
            self.stats.drop("udp.socket_error")
            self.log.debug("udp.flow.open_failed", error=exc.strerror)
            return None
        return flow if self._register(flow, sock) else None

    def _register(self, flow: UdpFlow, sock: socket.socket) -> bool:
        """A new flow with a host socket of its own: into the table, its replies watched. False (socket
        closed) when the table is full."""
        _tune(sock)
        flow.sock = sock
        try:
            self.flows.add(flow)
        except FlowTableFull:
            sock.close()
            flow.sock = None
            self.stats.drop("flow.table_full")
            return False
        self.active[flow.flow_id] = flow
        self.loop.add_reader(sock.fileno(), self._on_flow_readable, flow)
        self.emit("opened", flow, "ACTIVE", "")
        return True

    # -- namespace loopback → host loopback (-U) ------------------------------------------------------------

    def on_ns_listener(self, listener: Listener, sock: socket.socket) -> None:
        """-U: a datagram to a port on the namespace's loopback goes to the same port on the host's; each
        namespace peer is a flow with a host socket of its own, whose replies go back through `sock`."""
        now = self.loop.time()
        view = self._rview
        for _ in range(BATCH):
            try:
                n, peer = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            flow = self._ns_flows.get((listener.target_port, peer))
            if flow is None or flow.sock is None:
                flow = self._ns_flow(listener.target_port, sock, peer, now)
                if flow is None:
                    continue
            flow.last_active = now
            flow.packets_from_guest += 1
            flow.bytes_from_guest += n
            try:
                flow.sock.send(view[:n])
            except OSError as exc:
                self._send_failed(flow, exc, 1)

    def _ns_flow(self, port: int, back: socket.socket, peer: Any, now: float) -> UdpFlow | None:
        family = back.family
        loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        addr = socket.inet_pton(family, loopback)
        peer_addr = socket.inet_pton(family, peer[0])
        flow = UdpFlow(
            self.flows.new_id(), PROTO_UDP, (PROTO_UDP, key_addr(peer_addr), peer[1], -port), now, now,
            guest_initiated=True, v6=family == socket.AF_INET6, guest_addr=peer_addr, guest_port=peer[1],
            remote_addr=addr, remote_port=port, target_addr=addr, target_port=port, back=back, back_addr=peer,
        )  # fmt: skip
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            sock.connect((loopback, port))
        except OSError as exc:
            sock.close()
            self.stats.drop("udp.socket_error")
            self.log.debug("udp.ns_flow.open_failed", error=exc.strerror)
            return None
        if not self._register(flow, sock):
            return None
        self._ns_flows[(port, peer)] = flow
        return flow

    def _relay_back(self, flow: UdpFlow, now: float) -> None:
        """-U: the host's replies, back to the namespace peer through the listening socket it used."""
        sock, back, peer = flow.sock, flow.back, flow.back_addr
        view = self._rview
        count = nbytes = 0
        for _ in range(BATCH):
            try:
                n = sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            try:
                back.sendto(view[:n], peer)
            except OSError as exc:
                self._send_failed(flow, exc, 1)
                continue
            count += 1
            nbytes += n
        if count:
            flow.last_active = now
            flow.packets_to_guest += count
            flow.bytes_to_guest += nbytes

    # -- host → guest -------------------------------------------------------------------------------------

    def _on_flow_readable(self, flow: UdpFlow) -> None:
        now = self.loop.time()
        if flow.back is not None:
            if flow.sock is not None:
                self._relay_back(flow, now)
            return
        sock = flow.sock
        if sock is None:
            return
        recv_into = sock.recv_into
        view = self._rview
        to_guest = self._to_guest
        count = nbytes = 0
        for _ in range(BATCH):
            try:
                n = recv_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP errors (port unreachable) queued on the connected socket
                if exc.errno != errno.ECONNREFUSED:
                    self.log.debug("udp.recv.failed", flow_id=flow.flow_id, error=exc.strerror)
                continue
            to_guest(flow, view[:n])
            count += 1
            nbytes += n
        if count:
            flow.last_active = now
            flow.packets_to_guest += count
            flow.bytes_to_guest += nbytes
        self.after_batch(now)

    def on_listener(self, listener: Listener, sock: socket.socket) -> None:
        """Datagrams on a forwarded port: each peer is a flow toward the guest, sharing this socket."""
        now = self.loop.time()
        guest_port = listener.target_port
        peer_flows = self._peer_flows
        view = self._rview
        for _ in range(BATCH):
            try:
                n, peer = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            flow = peer_flows.get((guest_port, peer))
            if flow is None or flow.sock is None:
                flow = self._host_flow(peer, guest_port, sock, now)
                if flow is None:
                    continue
            flow.last_active = now
            flow.packets_to_guest += 1
            flow.bytes_to_guest += n
            self._to_guest(flow, view[:n])
        self.after_batch(now)

    def _to_guest(self, flow: UdpFlow, payload: memoryview) -> None:
        """One datagram toward the guest, from the address and port it expects; with a virtio-net tap the
        kernel completes the UDP checksum. `payload` views the shared receive buffer: the sinks copy it."""
        tpl = guest_template(flow)
        ethertype = ETH_P_IPV6 if tpl.v6 else ETH_P_IP
        if self.to_tap_vnet is not None:
            vnet = self._vnet6 if tpl.v6 else self._vnet4
            self.to_tap_vnet(vnet, ethertype, udp_headers_partial(tpl, len(payload)), payload)
        else:
            self.to_tap(ethertype, udp_headers(tpl, payload), -1, payload)

    def _host_flow(self, peer: Any, guest_port: int, sock: socket.socket, now: float) -> UdpFlow | None:
        v6 = sock.family == socket.AF_INET6
        packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, peer[0])
        if v6 and packed[:12] == bytes(10) + b"\xff\xff":
            packed, v6 = packed[12:], False
        peer_port: int = peer[1]
        net = self.ctx.ip6 if v6 else self.ctx.ip4
        if net is None:
            self.stats.drop("udp.family_disabled")
            return None
        remote = remote_as_seen(self.ctx, packed)
        flow = self.flows.get(udp_key(remote, peer_port, guest_port))
        if not isinstance(flow, UdpFlow) or flow.sock is None:
            seen = [a for a in (self.guest.addrs6 if v6 else self.guest.addrs4) if not a.is_link_local]
            guest_addr = (seen[-1] if seen else net.addr).packed
            flow = new_host_flow(
                self.flows.new_id(), guest_addr, guest_port, remote, packed, peer_port, sock, now
            )
            flow.sock_addr = peer
            try:
                self.flows.add(flow)
            except FlowTableFull:
                self.stats.drop("flow.table_full")
                return None
            self.active[flow.flow_id] = flow
            self.emit("opened", flow, "ACTIVE", "")
        key = (guest_port, peer)
        self._peer_flows[key] = flow
        self._peer_keys.setdefault(flow.flow_id, []).append(key)
        return flow

    # -- lifetime ------------------------------------------------------------------------------------------

    def expire(self, now: float, idle: float) -> None:
        for flow in [f for f in self.active.values() if now - f.last_active > idle]:
            self.close_flow(flow, "timeout")

    def close_flow(self, flow: UdpFlow, reason: str) -> None:
        if self._gso_flow is flow:
            self.flush_to_host()
        if self._last is flow:
            self._last = None
        self.active.pop(flow.flow_id, None)
        if flow.back is not None and self._ns_flows.get((flow.target_port, flow.back_addr)) is flow:
            del self._ns_flows[(flow.target_port, flow.back_addr)]
        for key in self._peer_keys.pop(flow.flow_id, ()):
            if self._peer_flows.get(key) is flow:
                del self._peer_flows[key]
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
        self.flush_to_host()
        for flow in list(self.active.values()):
            self.close_flow(flow, "shutdown")
