"""UDP sockets for the UDP flows of core/udp.py: open, bind, relay, close. The decisions are `UdpCore`'s.

Per datagram, both directions stay lean, since everything shares one CPU with the guest and its peers:

- Guest → host: `UdpCore.find` checks the previous datagram's flow before the flow table. Within a tap batch
  (the dataplane calls `begin_batch`/`end_batch` around it), datagrams of one flow and one size are gathered
  by the core and sent here in one `sendmsg` with UDP_SEGMENT, which the kernel cuts into the same datagrams
  at a fraction of the per-send cost; the last run leaves at `end_batch`, before any other frame is read. A
  lone datagram (request/response) is sent at once. A route that refuses segmentation (EIO/EINVAL) turns it
  off for that flow.
- Host → guest: many datagrams per readiness event, read into one preallocated buffer; the IP and UDP
  headers come from the flow's template; `to_tap` copies the payload once into the frame.
- Limits: a new flow beyond the caps, or one whose socket cannot be made because descriptors ran out, is
  refused with ICMP port unreachable toward the guest and counted (`limit.*`, `fd.exhausted`).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Final, Protocol

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.egress import Egress
from passtd.dataplane.core.flowtable import OUT_FROM_GUEST, OUT_TO_GUEST, V4_MAPPED, Flow, FlowTable
from passtd.dataplane.core.fwd import Listener
from passtd.dataplane.core.ratelimit import Shaper
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.udp import (
    EGRESS_DENIED_UDP,
    FLUSH_FIRST,
    RUN_COMPLETE,
    SEND_ALONE,
    DatagramSocket,
    SockAddr,
    UdpCore,
    UdpFlow,
    guest_template,
    port_unreachable,
    segments,
)
from passtd.dataplane.io.limits import is_fd_exhausted
from passtd.dataplane.io.sockets import Outbound, sockaddr
from passtd.dataplane.packets.ethernet import ETH_P_IP, ETH_P_IPV6
from passtd.dataplane.packets.udp import UdpHeader, udp_headers, udp_headers_partial, udp_offload_vnet_header

RECV_SIZE: Final = 65536
BATCH: Final = 64
SOCK_BUF: Final = 4 << 20  # SO_RCVBUF/SO_SNDBUF asked for on flow sockets (the kernel caps it unless root)
UDP_SEGMENT: Final = 103  # linux/udp.h: setsockopt/cmsg level SOL_UDP
SOL_UDP: Final = 17
SO_SNDBUFFORCE: Final = 32  # asm-generic/socket.h; Python's socket module does not name them
SO_RCVBUFFORCE: Final = 33
_U16 = struct.Struct("=H")  # the cmsg carries the segment size in host byte order
_GSO_REFUSED: Final = frozenset((errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT))


class ToTap(Protocol):
    """The dataplane's frame collector: `payload` follows `packet` and is copied (its buffer is reused)."""

    def __call__(
        self, ethertype: int, packet: bytes, offload: int = -1, payload: bytes | memoryview = b""
    ) -> None: ...


class DebugLog(Protocol):
    def debug(self, event: str, /, **kw: object) -> object: ...


# Optional: collect a frame that carries its own virtio-net header (tap with IFF_VNET_HDR). With it, frames
# toward the guest leave the UDP checksum to the kernel (NEEDS_CSUM). Arguments: vnet header, ethertype,
# IP+UDP headers, payload (copied, like `ToTap`).
ToTapVnet = Callable[[bytes, int, bytes, memoryview], None]
Emit = Callable[[str, Flow, str, str], None]


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
        emit: Emit,
        log: DebugLog,
        to_tap_vnet: ToTapVnet | None = None,
        egress: Egress | None = None,
        shaper: Shaper | None = None,
    ) -> None:
        self.core = UdpCore(ctx, flows, stats, guest, egress)
        self.loop = loop
        self.flows = flows
        self.stats = stats
        self.to_tap = to_tap
        self.to_tap_vnet = to_tap_vnet
        self.after_batch = after_batch
        self.emit = emit
        self.log = log
        self._vnet4 = udp_offload_vnet_header(False)
        self._vnet6 = udp_offload_vnet_header(True)
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self.gso_sends = 0  # sendmsg calls that carried several datagrams (plain ints: read by tests, status)
        self.gso_datagrams = 0
        self.outbound = Outbound()  # --outbound source addresses
        # the guest's rate limits: the dataplane's, shared with TCP and ICMP
        self.shaper = shaper if shaper is not None else Shaper()

    @property
    def active(self) -> dict[int, UdpFlow]:
        return self.core.active

    # -- guest → host -------------------------------------------------------------------------------------

    def begin_batch(self, frames: int) -> None:
        """The dataplane is about to hand over a tap batch of `frames` frames."""
        self.core.begin_batch(frames)

    def end_batch(self) -> None:
        """The batch is over: the gathered run leaves now."""
        self.flush_to_host()
        self.core.end_batch()

    def from_guest(self, v6: bool, src: bytes, dst: bytes, udp: UdpHeader, now: float) -> None:
        sport, dport, payload = udp.sport, udp.dport, udp.payload
        shaper = self.shaper
        if shaper.egress is not None and not shaper.admit(shaper.egress, len(payload), now, "udp.egress"):
            self.stats.drop("rate.udp.egress")
            return
        core = self.core
        flow = core.find(src, dst, sport, dport)
        if flow is None:
            flow = self._open(v6, src, dst, sport, dport, payload, now)
            if flow is None:
                return
            core.last = flow
        sock = flow.sock
        assert sock is not None  # find() and _open() return flows with a socket only
        n = len(payload)
        flow.last_active = now
        flow.packets_from_guest += 1
        flow.bytes_from_guest += n
        if not flow.own_sock:
            try:
                sock.sendto(payload, flow.sock_addr or ("", 0))
            except OSError as exc:
                self._send_failed(flow, exc, 1)
            return
        verdict = core.gather(flow, payload)
        if verdict == FLUSH_FIRST:
            self.flush_to_host()
            verdict = core.gather(flow, payload)
        if verdict == SEND_ALONE:
            try:
                sock.send(payload)
            except OSError as exc:
                self._send_failed(flow, exc, 1)
        elif verdict == RUN_COMPLETE:
            self.flush_to_host()

    def flush_to_host(self) -> None:
        """Send the gathered run, as one UDP GSO send when it holds several datagrams."""
        taken = self.core.take_run()
        if taken is None:
            return
        flow, data, size, count = taken
        sock = flow.sock
        if sock is None:  # closed meanwhile
            return
        try:
            if count == 1:
                sock.send(data)
            else:
                sock.sendmsg((data,), ((SOL_UDP, UDP_SEGMENT, _U16.pack(size)),))
                self.gso_sends += 1
                self.gso_datagrams += count
        except OSError as exc:
            if count > 1 and exc.errno in _GSO_REFUSED:
                flow.no_gso = True  # no checksum offload or segmentation on this route: one by one
                self.log.debug("udp.gso.disabled", flow_id=flow.flow_id, error=exc.strerror)
                for segment in segments(data, size):
                    try:
                        sock.send(segment)
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

    def _refused(self, v6: bool, src: bytes, dst: bytes, sport: int, dport: int, payload: memoryview) -> None:
        """A new flow we cannot carry (a cap, or no descriptor left): port unreachable, as a host without
        that service would answer, so the guest's application fails at once instead of timing out."""
        self.to_tap(ETH_P_IPV6 if v6 else ETH_P_IP, port_unreachable(v6, src, dst, sport, dport, payload))

    def _socket_failed(self, exc: OSError, what: str) -> None:
        if is_fd_exhausted(exc):
            self.stats.drop("fd.exhausted")
        else:
            self.stats.drop("udp.socket_error")
        self.log.debug(what, error=exc.strerror)

    def _open(
        self, v6: bool, src: bytes, dst: bytes, sport: int, dport: int, payload: memoryview, now: float
    ) -> UdpFlow | None:
        admitted = self.core.admit(v6, src, dst, sport, dport, now)
        if isinstance(admitted, str):
            if admitted.startswith("limit."):
                self._refused(v6, src, dst, sport, dport, payload)
            elif admitted == EGRESS_DENIED_UDP:  # no socket: administratively prohibited, at once
                self.to_tap(
                    ETH_P_IPV6 if v6 else ETH_P_IP,
                    port_unreachable(v6, src, dst, sport, dport, payload, True),
                )
            return None
        flow = admitted
        target = flow.target_addr
        family = socket.AF_INET6 if len(target) == 16 else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self._socket_failed(exc, "udp.flow.open_failed")
            if is_fd_exhausted(exc):
                self._refused(v6, src, dst, sport, dport, payload)
            return None
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
            self._socket_failed(exc, "udp.flow.open_failed")
            return None
        return flow if self._register(flow, sock) else None

    def _register(self, flow: UdpFlow, sock: socket.socket) -> bool:
        """A new flow with a host socket of its own: into the table, its replies watched. False (socket
        closed) when the table refuses it."""
        _tune(sock)
        if self.core.register(flow, sock):
            sock.close()
            return False
        self.loop.add_reader(sock.fileno(), self._on_flow_readable, flow)
        self.emit("opened", flow, "ACTIVE", "")
        return True

    # -- namespace loopback → host loopback (-U) ------------------------------------------------------------

    def on_ns_listener(self, listener: Listener, sock: socket.socket) -> None:
        """-U: a datagram to a port on the namespace's loopback goes to the same port on the host's; each
        namespace peer is a flow with a host socket of its own, whose replies go back through `sock`."""
        now = self.loop.time()
        view = self._rview
        tally = listener.tally
        for _ in range(BATCH):
            try:
                n, peer = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            flow = self.core.ns_flow(listener.target_port, peer)
            if flow is None:
                flow = self._ns_flow(listener.target_port, sock, peer, now)
                if flow is None:
                    continue
                if tally is not None:
                    tally.attach(flow, OUT_TO_GUEST)
            if tally is not None:
                tally.datagrams += 1
                tally.bytes_in += n
            flow.last_active = now
            flow.packets_from_guest += 1
            flow.bytes_from_guest += n
            assert flow.sock is not None
            try:
                flow.sock.send(view[:n])
            except OSError as exc:
                self._send_failed(flow, exc, 1)

    def _ns_flow(self, port: int, back: socket.socket, peer: SockAddr, now: float) -> UdpFlow | None:
        family = back.family
        loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        made = self.core.new_ns_flow(
            port, back, peer, family == socket.AF_INET6, socket.inet_pton(family, loopback),
            socket.inet_pton(family, peer[0]), now,
        )  # fmt: skip
        if isinstance(made, str):
            return None
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self._socket_failed(exc, "udp.ns_flow.open_failed")
            return None
        try:
            sock.connect((loopback, port))
        except OSError as exc:
            sock.close()
            self._socket_failed(exc, "udp.ns_flow.open_failed")
            return None
        if not self._register(made, sock):
            return None
        self.core.ns_registered(made)
        return made

    def _relay_back(self, flow: UdpFlow, sock: DatagramSocket, back: DatagramSocket, now: float) -> None:
        """-U: the host's replies, back to the namespace peer through the listening socket it used."""
        peer = flow.back_addr
        assert peer is not None
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
        sock = flow.sock
        if sock is None:
            return
        if flow.back is not None:
            self._relay_back(flow, sock, flow.back, now)
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
            if to_guest(flow, view[:n], now):
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
        tally = listener.tally
        guest_port = listener.target_port
        core = self.core
        view = self._rview
        for _ in range(BATCH):
            try:
                n, peer = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            flow = core.peer_flow(guest_port, peer)
            if flow is None:
                flow = self._host_flow(peer, guest_port, sock, now, listener.target_addr)
                if flow is None:
                    continue
                if tally is not None:
                    tally.attach(flow, OUT_FROM_GUEST)  # its replies; datagrams in are counted here
            if tally is not None:
                tally.datagrams += 1
                tally.bytes_in += n
            flow.last_active = now
            if self._to_guest(flow, view[:n], now):
                flow.packets_to_guest += 1
                flow.bytes_to_guest += n
        self.after_batch(now)

    def _to_guest(self, flow: UdpFlow, payload: memoryview, now: float) -> bool:
        """One datagram toward the guest, from the address and port it expects; with a virtio-net tap the
        kernel completes the UDP checksum. `payload` views the shared receive buffer: the sinks copy it.
        False: over the ingress rate limit, dropped and counted."""
        shaper = self.shaper
        if shaper.ingress is not None and not shaper.admit(shaper.ingress, len(payload), now, "udp.ingress"):
            self.stats.drop("rate.udp.ingress")
            return False
        tpl = guest_template(flow)
        ethertype = ETH_P_IPV6 if tpl.v6 else ETH_P_IP
        if self.to_tap_vnet is not None:
            vnet = self._vnet6 if tpl.v6 else self._vnet4
            self.to_tap_vnet(vnet, ethertype, udp_headers_partial(tpl, len(payload)), payload)
        else:
            self.to_tap(ethertype, udp_headers(tpl, payload), -1, payload)
        return True

    def _host_flow(
        self, peer: SockAddr, guest_port: int, sock: socket.socket, now: float,
        target: IPv4Address | IPv6Address | None = None,
    ) -> UdpFlow | None:  # fmt: skip
        """A flow toward the guest for `peer`; `target` (the rule's target address) replaces the guest's."""
        v6 = sock.family == socket.AF_INET6
        packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, peer[0])
        if v6 and packed[:12] == V4_MAPPED:
            packed, v6 = packed[12:], False
        found = self.core.host_flow(
            v6, packed, peer, guest_port, sock, now, b"" if target is None else target.packed
        )
        if found is None:
            return None
        flow, new = found
        if new:
            self.emit("opened", flow, "ACTIVE", "")
        return flow

    # -- lifetime ------------------------------------------------------------------------------------------

    def expire(self, now: float, idle: float) -> None:
        for flow in self.core.expired(now, idle):
            self.close_flow(flow, "timeout")

    def close_flow(self, flow: UdpFlow, reason: str) -> None:
        if self.core.run_flow is flow:
            self.flush_to_host()
        self.core.forget(flow)
        sock = flow.sock
        if flow.own_sock and sock is not None:
            try:
                self.loop.remove_reader(sock.fileno())
            except (ValueError, OSError):
                pass
            sock.close()
        flow.sock = None
        self.emit("closed", flow, "CLOSED", reason)

    def close_all(self, reason: str) -> int:
        """Close every flow (the guest went away, or shutdown); returns how many."""
        self.flush_to_host()
        closing = list(self.core.active.values())
        for flow in closing:
            self.close_flow(flow, reason)
        return len(closing)

    def close(self) -> None:
        self.close_all("shutdown")
