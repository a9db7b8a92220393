"""The imperative shell: readiness → batch of frames → core → replies and socket work → flush.

Dispatch is synchronous: a readiness callback drains up to `BATCH` frames, feeds them all to the core, then
writes every reply in one `send_batch`. Only `MalformedFrame` is caught at the tap boundary (counted per
reason, logged at debug); any other exception is a bug and reaches the loop's exception handler.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import struct
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final, Literal

from passtd.dataplane.core.context import Context, Guest, is_loopback
from passtd.dataplane.core.demux import Demux
from passtd.dataplane.core.flowtable import PROTO_TCP, Flow, FlowEvent, FlowTable, FlowTableFull, key_addr
from passtd.dataplane.core.fwd import ForwardTables, Listener
from passtd.dataplane.core.icmp import EchoFlow, EchoToHost, echo_to_guest, expired
from passtd.dataplane.core.services.ndp import NdpResponder
from passtd.dataplane.core.splice import SpliceFlow
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.tcp.handler import TcpHandler
from passtd.dataplane.core.tcp.states import state_name
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.core.udp import UdpFlow
from passtd.dataplane.io.autoscan import read_bound_ports
from passtd.dataplane.io.listeners import BindResult, ListenerSet
from passtd.dataplane.io.netns import run_in_netns
from passtd.dataplane.io.pcap import PcapWriter
from passtd.dataplane.io.sockets import (
    HostSockets,
    Outbound,
    open_ping_socket,
    ping_group_hint,
    sockaddr,
    splice_target_ns,
)
from passtd.dataplane.io.splice import SplicedPair
from passtd.dataplane.io.tap.base import OutFrame, TapBackend
from passtd.dataplane.io.tcp import TcpIo
from passtd.dataplane.io.timer import DeadlineTimer
from passtd.dataplane.io.udp import UdpRelay
from passtd.dataplane.packets.ethernet import ETH_P_IP, ETH_P_IPV6, build_ethernet
from passtd.dataplane.packets.vnet import tcp_offload_header
from passtd.errors import MalformedFrame
from passtd.logging import get_logger

BATCH: Final = 64
TAP_BACKLOG_LIMIT: Final = 2 * 1024 * 1024  # bytes queued toward the guest before TCP holds its data
RESUME_ROUNDS: Final = 8  # per callback, rounds of "flush, then let held flows send again"
TICK: Final = 1.0


class Dataplane:
    def __init__(
        self,
        ctx: Context,
        loop: asyncio.AbstractEventLoop,
        pcap: PcapWriter | None = None,
        max_flows: int = 1 << 18,
        dns_forward: tuple[IPv4Address | IPv6Address, ...] = (),
        dns_upstream: tuple[IPv4Address | IPv6Address, ...] = (),
        vnet: bool = False,
        sockets: HostSockets | None = None,
    ) -> None:
        self.vnet = vnet  # pasta: the tap carries virtio-net headers, TCP offloads go to the kernel
        self.ctx = ctx
        self.loop = loop
        self.log = get_logger(component="dataplane")
        self.pcap = pcap
        self.guest = Guest()
        self.stats = Stats()
        self.flows = FlowTable(max_flows)
        self.ndp = NdpResponder(ctx)
        self.timeouts = Timeouts()
        self._out: list[OutFrame] = []
        self.tcp_io = TcpIo()
        self.watchers: list[Callable[[FlowEvent], None]] = []
        self.tcp = TcpHandler(
            ctx, self.guest, self.flows, self.stats, self.tcp_io, self._to_tap, os.urandom(16),
            self.timeouts, on_close=self._on_tcp_close, on_state=self._on_tcp_state, offload=vnet,
            congested=self._tap_congested, watching=self.watchers,
        )  # fmt: skip
        self._out_bytes = 0
        self._eth_mac: bytes | None = b""  # guest MAC the cached Ethernet headers were made for
        self._eth: dict[int, bytes] = {}
        self._vnet: dict[tuple[bool, int, int], bytes] = {}
        self._resume_scheduled = False
        self.tcp_io.on_connected = lambda conn: self.tcp.sock_connected(conn, self.loop.time())
        self.tcp_io.on_error = lambda conn, reason: self.tcp.sock_error(conn, reason, self.loop.time())
        self.tcp_io.on_readable = lambda conn, eof: self.tcp.sock_readable(conn, self.loop.time(), eof)
        self.tcp_io.on_writable = lambda conn: self.tcp.sock_writable(conn, self.loop.time())
        self.loop.add_reader(self.tcp_io.fileno(), self._on_tcp_events)
        self._timer = DeadlineTimer(loop, self._on_tcp_timer)
        self.udp = UdpRelay(
            ctx, loop, self.flows, self.stats, self.guest, self._to_tap, self._after_batch, self._emit,
            self.log, dns_forward, dns_upstream, to_tap_vnet=self._to_tap_vnet if vnet else None,
        )  # fmt: skip
        hs = self.host_sockets = sockets if sockets is not None else HostSockets()
        self.tcp_io.outbound = self.udp.outbound = Outbound(hs.outbound, hs.outbound_if4, hs.outbound_if6)
        self.demux = Demux(
            ctx, self.guest, self.stats, self.flows, self.ndp, self.tcp.tap_segment, self.udp.from_guest
        )
        self.forward = ForwardTables("passt")
        self.tcp_listeners = ListenerSet(
            "tcp", loop, self._on_tcp_listener, freebind=hs.freebind, enabled=ctx.tcp
        )
        self.udp_listeners = ListenerSet(
            "udp", loop, self.udp.on_listener, freebind=hs.freebind, enabled=ctx.udp
        )
        self.netns_fd: int | None = None  # pasta: the namespace, for -T and spliced loopback paths
        self.tcp_ns_listeners: ListenerSet | None = None
        self.udp_ns_listeners: ListenerSet | None = None
        self._auto_last: dict[str, frozenset[int]] = {}
        raise_nofile_limit()
        self.tap: TapBackend | None = None
        self.disconnected: asyncio.Event = asyncio.Event()
        self._ping_socks: dict[int, socket.socket] = {}
        self._ping_refused = False
        self._tick: asyncio.TimerHandle | None = None

    # -- tap side -------------------------------------------------------------------------------------------

    def attach(self, tap: TapBackend) -> None:
        """Start serving a guest; one at a time."""
        self.tap = tap
        tap.on_drained = self._on_tap_drained
        self.disconnected.clear()
        self.loop.add_reader(tap.fileno(), self._on_tap_readable)
        if self._tick is None:
            self._tick = self.loop.call_later(TICK, self._on_tick)
        self.log.info("tap.attached", fd=tap.fileno())

    def detach(self) -> None:
        tap = self.tap
        if tap is None:
            return
        self.tap = None
        try:
            self.loop.remove_reader(tap.fileno())
        except (ValueError, OSError):
            pass
        tap.close()
        self.guest.mac = None
        self.disconnected.set()
        self.log.info("tap.detached")

    def _on_tap_readable(self) -> None:
        tap = self.tap
        if tap is None:
            return
        try:
            frames = tap.recv_batch(BATCH)
        except MalformedFrame as exc:
            self.stats.drop(exc.reason)
            self.log.warning("tap.stream.desync", reason=exc.reason)
            self.detach()
            return
        except EOFError:
            self.detach()
            return
        if not frames:
            return
        now = self.loop.time()
        replies: list[bytes] = []  # ARP, DHCP, NDP answers (the flows' frames go through _to_tap)
        actions: list[EchoToHost] = []
        stats = self.stats
        stats.frames_from_tap += len(frames)
        stats.bytes_from_tap += sum(map(len, frames))
        pcap = self.pcap
        handle = self.demux.handle_frame
        try:
            for frame in frames:
                if pcap is not None:
                    pcap.write(frame)
                try:
                    handle(frame, now, replies, actions)
                except MalformedFrame as exc:
                    stats.drop(exc.reason)
                    self.log.debug("tap.frame.dropped", reason=exc.reason, length=len(frame))
        finally:
            self.tcp.flush_tx()  # guest data views the frames' buffers: written before the next read
        self.udp.flush_to_host()  # datagrams gathered from this batch, in one send per flow
        for reply in replies:
            self._out.append(reply)
            self._out_bytes += len(reply)
        for action in actions:
            self._echo_to_host(action)
        self._after_batch(now)

    def _to_tap(
        self, ethertype: int, packet: bytes, offload: int = -1, payload: bytes | memoryview = b""
    ) -> None:
        """Frames from the flows, collected until the end of the batch. `offload` >= 0: a TCP packet whose
        checksum (and, above 0, segmentation at that size) is left to the kernel via the virtio-net header.
        `payload` follows `packet` on the wire. Without offload it is copied into the frame; with it, it is
        a view into the TCP peek arena that the frame points to until the batch is written."""
        head = self._eth_head(ethertype, packet)
        self._out_bytes += len(head) + len(payload)
        if offload < 0:
            self._out.append(head + payload if payload else head)
            return
        v6 = ethertype == ETH_P_IPV6
        tcp_hlen = (packet[(40 if v6 else 20) + 12] >> 4) * 4
        key = (v6, tcp_hlen, offload)
        vnet = self._vnet.get(key)
        if vnet is None:
            vnet = self._vnet[key] = tcp_offload_header(v6, tcp_hlen, offload)
            if len(self._vnet) > 256:  # MSS values are few; bound it anyway
                self._vnet.clear()
        # The payload views the TCP peek arena, valid until the batch is written: no copy here.
        self._out.append((vnet, head, payload) if payload else (vnet, head))

    def _eth_head(self, ethertype: int, packet: bytes) -> bytes:
        mac = self.guest.mac
        if mac is not self._eth_mac:  # Ethernet headers are made once per guest MAC, not per frame
            self._eth_mac = mac
            dst = self.guest.dst_mac
            self._eth = {t: build_ethernet(dst, self.ctx.our_mac, t, b"") for t in (ETH_P_IP, ETH_P_IPV6)}
        prefix = self._eth.get(ethertype)
        if prefix is None:
            return build_ethernet(self.guest.dst_mac, self.ctx.our_mac, ethertype, packet)
        return prefix + packet

    def _to_tap_vnet(self, vnet: bytes, ethertype: int, packet: bytes, payload: memoryview) -> None:
        """A frame with its own virtio-net header (UDP whose checksum the kernel completes)."""
        head = self._eth_head(ethertype, packet)
        self._out_bytes += len(head) + len(payload)
        self._out.append((vnet, head, bytes(payload)) if payload else (vnet, head))

    def _after_batch(self, now: float) -> None:
        """Every callback ends here: ACKs the TCP core owes, one write of all frames, timer re-armed."""
        for _ in range(RESUME_ROUNDS):
            if self.tcp.prepare_acks(now) or self.tcp_io.connecting:
                # Answers the host side already wrote go out now and carry the ACKs along: a request's ACK
                # and its response then cost one frame, not two. A connect to loopback has usually
                # completed already too, so its SYN-ACK leaves in this round rather than the next.
                self.tcp_io.poll()
            self.tcp.emit_acks()
            if self._out:
                out, self._out = self._out, []
                nbytes, self._out_bytes = self._out_bytes, 0
                self.send_to_tap(out, nbytes)
            self.tcp_io.arena.reset()  # the frames that pointed into it are written
            if not self.tcp.has_blocked() or self._tap_congested():
                break  # a stream tap that is still behind resumes the flows from its drained callback
            self.tcp.unblock(now)  # the batch limit, not the tap, stopped them: carry on
        else:
            if not self._resume_scheduled:
                self._resume_scheduled = True
                self.loop.call_soon(self._resume)  # let other descriptors have a turn first
        self._timer.arm(self.tcp.next_deadline())

    def _resume(self) -> None:
        self._resume_scheduled = False
        now = self.loop.time()
        self.tcp.unblock(now)
        self._after_batch(now)

    def _tap_congested(self) -> bool:
        """Whether the TCP core should hold its data: the tap still has this much unsent (passt mode's stream
        socket can fall behind a slow guest; sending more would only be dropped and retransmitted)."""
        tap = self.tap
        return self._out_bytes + (tap.backlog if tap is not None else 0) > TAP_BACKLOG_LIMIT

    def _on_tap_drained(self) -> None:
        now = self.loop.time()
        self.tcp.unblock(now)
        self._after_batch(now)

    def _on_tcp_timer(self, now: float) -> None:
        self.tcp.on_timer(now)
        self._after_batch(now)

    def _on_tcp_events(self) -> None:
        for _ in range(16):  # bounded: other sockets and the tap get their turn
            if self.tcp_io.poll() < 256:
                break
        self._after_batch(self.loop.time())

    def _on_tcp_close(self, conn: TcpConn, reason: str) -> None:
        self.log.debug("tcp.flow.closed", flow_id=conn.flow_id, reason=reason)
        self._emit("closed", conn, "CLOSED", reason)

    def _on_tcp_state(self, conn: TcpConn, before: str, after: str) -> None:
        self._emit("opened" if before == "CLOSED" else "state", conn, after)

    def _emit(self, kind: str, flow: Flow, state: str, reason: str = "") -> None:
        if self.watchers:
            event = FlowEvent(kind, flow, state, reason, self.loop.time())
            for watcher in list(self.watchers):
                watcher(event)

    # -- control ---------------------------------------------------------------------------------------------

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Takes effect at the next timer tick: every TCP deadline is recomputed from the new values."""
        self.timeouts = timeouts
        self.tcp.timeouts = timeouts
        self.tcp.reschedule_all()
        self._after_batch(self.loop.time())

    def reset_flow(self, flow_id: int, reason: str = "reset_by_api") -> Flow | None:
        """RST both sides of one flow (datagram flows are just closed); None when the id is unknown."""
        flow = self.flows.by_id(flow_id)
        if isinstance(flow, TcpConn):
            self.tcp.reset(flow, reason)
        elif isinstance(flow, EchoFlow):
            self._close_echo(flow, reason)
        elif isinstance(flow, UdpFlow):
            self.udp.close_flow(flow, reason)
        elif isinstance(flow, SpliceFlow) and flow.pair is not None:
            flow.pair.reset()
        elif flow is not None:
            self.flows.remove(flow)
            self._emit("closed", flow, "CLOSED", reason)
        self._after_batch(self.loop.time())
        return flow

    def set_forwarding(self, tables: ForwardTables) -> list[BindResult]:
        """Replace the port policy: diff the listeners, report each bind; flows are never touched."""
        ephemeral = local_port_range()
        old = self.forward
        self.forward = tables
        self._auto_last.clear()  # `auto` tables are rebuilt at the next tick
        results = self.tcp_listeners.apply(tables.tcp_in.listeners(ephemeral))
        results += self.udp_listeners.apply(tables.udp_in.listeners(ephemeral))
        if self.netns_fd is not None and (self.tcp_ns_listeners is not None or tables.tcp_out.rules):
            results += self._ns_listeners("tcp").apply(on_loopback(tables.tcp_out.listeners(ephemeral)))
        if self.netns_fd is not None and (self.udp_ns_listeners is not None or tables.udp_out.rules):
            results += self._ns_listeners("udp").apply(on_loopback(tables.udp_out.listeners(ephemeral)))
        for result in results:
            if not result.ok:
                self.log.warning("forward.bind.failed", port=result.listener.port, address=result.address,
                                 error=result.errno_name)  # fmt: skip
        if old.tcp_in != tables.tcp_in:
            self.log.info("forward.tcp.changed", spec=tables.tcp_in.to_spec())
        if old.udp_in != tables.udp_in:
            self.log.info("forward.udp.changed", spec=tables.udp_in.to_spec())
        return results

    def _ns_listeners(self, proto: Literal["tcp", "udp"]) -> ListenerSet:
        """-T/-U: listening sockets on the namespace's loopback, made on first use."""
        current = self.tcp_ns_listeners if proto == "tcp" else self.udp_ns_listeners
        if current is not None:
            return current
        netns_fd = self.netns_fd
        assert netns_fd is not None
        created = ListenerSet(
            proto, self.loop, self._on_tcp_ns_listener if proto == "tcp" else self.udp.on_ns_listener,
            socket_factory=lambda family, kind: run_in_netns(netns_fd, socket.socket, family, kind),
            enabled=self.ctx.tcp if proto == "tcp" else self.ctx.udp,
        )  # fmt: skip
        if proto == "tcp":
            self.tcp_ns_listeners = created
        else:
            self.udp_ns_listeners = created
        return created

    def _on_tcp_listener(self, listener: Listener, sock: socket.socket) -> None:
        self.accept_tcp(sock, listener.target_port)

    def _on_tcp_ns_listener(self, listener: Listener, sock: socket.socket) -> None:
        """-T: a connection inside the namespace to its loopback goes to the same port on the host's."""
        now = self.loop.time()
        for _ in range(64):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.log.warning("tcp.ns_accept.failed", error=exc.strerror)
                break
            self._splice(conn, peer, listener.target_port, in_netns=False, now=now)

    def _splice(self, accepted: socket.socket, peer: Any, port: int, *, in_netns: bool, now: float) -> None:
        """Join `accepted` to a new connection to loopback:port (inside the namespace when `in_netns`: its
        loopback with --host-lo-to-ns-lo, else its own address, `splice_target_ns`)."""
        v6 = accepted.family == socket.AF_INET6
        loopback = "::1" if v6 else "127.0.0.1"
        if in_netns:
            loopback = splice_target_ns(self.ctx, self.guest, v6, self.host_sockets.host_lo_to_ns_lo)
        family = socket.AF_INET6 if v6 else socket.AF_INET
        try:
            if in_netns:
                assert self.netns_fd is not None
                out = run_in_netns(self.netns_fd, socket.socket, family, socket.SOCK_STREAM)
            else:
                out = socket.socket(family, socket.SOCK_STREAM)
            out.setblocking(False)
            err = out.connect_ex((loopback, port))
        except OSError as exc:
            self.log.debug("tcp.splice.failed", error=exc.strerror)
            _reset(accepted)
            return
        if err not in (0, errno.EINPROGRESS):
            out.close()
            _reset(accepted)
            self.stats.handled["tcp.splice.refused"] += 1
            return
        addr = socket.inet_pton(family, loopback)
        flow = SpliceFlow(
            self.flows.new_id(), PROTO_TCP, (PROTO_TCP, key_addr(addr), peer[1], -port), now, now,
            guest_initiated=not in_netns, v6=v6, guest_addr=addr, guest_port=port if in_netns else peer[1],
            remote_addr=addr, remote_port=peer[1] if in_netns else port,
        )  # fmt: skip
        try:
            self.flows.add(flow)
        except FlowTableFull:
            out.close()
            _reset(accepted)
            self.stats.drop("flow.table_full")
            return

        def connected() -> None:
            self.loop.remove_writer(out.fileno())
            if out.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                out.close()
                _reset(accepted)
                self.flows.remove(flow)
                self._emit("closed", flow, "CLOSED", "connect_failed")
                return
            flow.pair = SplicedPair(
                self.loop, accepted, out, lambda pair, reason: self._spliced_done(flow, reason)
            )
            self._emit("opened", flow, "SPLICED")

        self.loop.add_writer(out.fileno(), connected)

    def _spliced_done(self, flow: SpliceFlow, reason: str) -> None:
        pair = flow.pair
        if pair is not None:
            flow.bytes_from_guest, flow.bytes_to_guest = (
                (pair.bytes_ba, pair.bytes_ab) if flow.guest_initiated else (pair.bytes_ab, pair.bytes_ba)
            )
        self.flows.remove(flow)
        self._emit("closed", flow, "CLOSED", reason)

    def accept_tcp(self, listener: socket.socket, guest_port: int) -> None:
        """A forwarded port is readable: accept every pending connection and offer each to the guest."""
        now = self.loop.time()
        for _ in range(64):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.log.warning("tcp.accept.failed", error=exc.strerror)
                break
            family_v6 = sock.family == socket.AF_INET6
            addr = socket.inet_pton(socket.AF_INET6 if family_v6 else socket.AF_INET, peer[0])
            if self.netns_fd is not None and self.host_sockets.splice and is_loopback(addr):
                self._splice(sock, peer, guest_port, in_netns=True, now=now)  # pasta's splice bypass
                continue
            port = self.tcp_io.adopt(sock)
            conn = self.tcp.accepted(port, addr, peer[1], guest_port, now)
            if conn is not None:
                self.tcp_io.bind(conn)
                self.log.debug("tcp.flow.accepted", flow_id=conn.flow_id, peer=peer[0], port=peer[1])
        self._after_batch(now)

    def send_to_tap(self, frames: Sequence[OutFrame], nbytes: int = -1) -> None:
        """`nbytes`: the frames' length without virtio-net headers, when the caller counted it already."""
        tap = self.tap
        if not frames or tap is None:
            return
        self.stats.frames_to_tap += len(frames)
        if nbytes < 0:
            nbytes = sum(sum(map(len, f[1:])) if isinstance(f, tuple) else len(f) for f in frames)
        self.stats.bytes_to_tap += nbytes
        if self.pcap is not None:
            for frame in frames:
                self.pcap.write(b"".join(frame[1:]) if isinstance(frame, tuple) else frame)
        tap.send_batch(frames)

    # -- ICMP echo ------------------------------------------------------------------------------------------

    def _echo_to_host(self, action: EchoToHost) -> None:
        flow = action.flow
        sock = self._ping_socks.get(flow.flow_id)
        if sock is None:
            try:
                sock = open_ping_socket(flow.v6, self.tcp_io.outbound, flow.target_addr)
            except PermissionError:
                self.stats.drop("icmp.ping_socket_forbidden")
                if not self._ping_refused:
                    self._ping_refused = True
                    self.log.warning("icmp.ping_socket.forbidden", hint=ping_group_hint())
                self.flows.remove(flow)
                return
            except OSError as exc:
                self.stats.drop("icmp.ping_socket_error")
                self.log.warning("icmp.ping_socket.error", error=exc.strerror)
                self.flows.remove(flow)
                return
            self._ping_socks[flow.flow_id] = sock
            self._emit("opened", flow, "ACTIVE")
            self.loop.add_reader(sock.fileno(), self._on_ping_readable, flow, sock)
            self.log.debug("icmp.flow.opened", flow_id=flow.flow_id, target=sockaddr(flow.target_addr, 0)[0])
        try:
            sock.sendto(action.message, sockaddr(flow.target_addr, 0))
        except OSError as exc:
            self.stats.drop("icmp.send_error")
            self.log.debug("icmp.send.failed", flow_id=flow.flow_id, error=exc.strerror)

    def _on_ping_readable(self, flow: EchoFlow, sock: socket.socket) -> None:
        out: list[bytes] = []
        now = self.loop.time()
        for _ in range(BATCH):
            try:
                message = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP errors queued on the socket: the guest's ping times out as it would
                self.log.debug("icmp.recv.failed", flow_id=flow.flow_id, error=exc.strerror)
                continue
            frame = echo_to_guest(self.ctx, self.guest.dst_mac, flow, message, now)
            if frame is not None:
                out.append(frame)
        self.send_to_tap(out)

    def _close_echo(self, flow: EchoFlow, reason: str = "timeout") -> None:
        self.flows.remove(flow)
        self._emit("closed", flow, "CLOSED", reason)
        sock = self._ping_socks.pop(flow.flow_id, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self.log.debug("icmp.flow.closed", flow_id=flow.flow_id)

    # -- timers ---------------------------------------------------------------------------------------------

    def _on_tick(self) -> None:
        now = self.loop.time()
        self._tick = self.loop.call_later(TICK, self._on_tick)
        if self.tap is not None and now >= self.ndp.next_deadline():
            ra = self.ndp.handle_timer(self.guest.mac, now)
            if ra is not None:
                self.send_to_tap([ra])
        self.udp.expire(now, self.timeouts.udp_idle)
        for flow in expired(self.flows, now, self.timeouts.icmp_idle):
            self._close_echo(flow)
        if self.pcap is not None:
            self.pcap.flush()
        if self.netns_fd is not None:
            self._auto_scan()

    def _auto_scan(self) -> None:
        """pasta `auto`: mirror the ports bound on each side into listeners on the other, every tick."""
        tables = self.forward
        netns_fd = self.netns_fd
        assert netns_fd is not None
        wanted: dict[str, set[Listener]] = {}
        for direction, policy in (
            ("tcp_in", tables.tcp_in),
            ("udp_in", tables.udp_in),
            ("tcp_out", tables.tcp_out),
            ("udp_out", tables.udp_out),
        ):
            if policy.mode != "auto":
                continue
            proto = direction[:3]
            if direction.endswith("_in"):  # ports bound in the namespace, forwarded from the host
                ports = run_in_netns(netns_fd, read_bound_ports, proto)
                theirs = self.tcp_ns_listeners if proto == "tcp" else self.udp_ns_listeners
                ours_there = theirs.listeners if theirs is not None else ()
            else:  # ports bound on the host, forwarded from the namespace's loopback
                ports = read_bound_ports(proto, "/proc/self/net")
                ours_there = (self.tcp_listeners if proto == "tcp" else self.udp_listeners).listeners
            ports -= {lst.port for lst in ours_there}
            key = frozenset(ports)
            if self._auto_last.get(direction) == key:
                continue
            self._auto_last[direction] = key
            wanted[direction] = {Listener(None, None, port, port) for port in ports}
        if "tcp_in" in wanted:
            self.tcp_listeners.apply(wanted["tcp_in"])
        if "udp_in" in wanted:
            self.udp_listeners.apply(wanted["udp_in"])
        if "tcp_out" in wanted:
            self._ns_listeners("tcp").apply(on_loopback(wanted["tcp_out"]))
        if "udp_out" in wanted:
            self._ns_listeners("udp").apply(on_loopback(wanted["udp_out"]))

    def close(self) -> None:
        for conn in [f for f in self.flows if isinstance(f, TcpConn)]:
            self.tcp.reset(conn, "shutdown")
        self._after_batch(self.loop.time())
        self._timer.cancel()
        self.loop.remove_reader(self.tcp_io.fileno())
        self.tcp_io.close()
        self.tcp_listeners.close()
        if self.tcp_ns_listeners is not None:
            self.tcp_ns_listeners.close()
        if self.udp_ns_listeners is not None:
            self.udp_ns_listeners.close()
        for spliced in [f for f in self.flows if isinstance(f, SpliceFlow)]:
            if spliced.pair is not None:
                spliced.pair.reset()
        self.udp.close()
        self.udp_listeners.close()
        self.detach()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for flow in [f for f in self.flows if isinstance(f, EchoFlow)]:
            self._close_echo(flow, "shutdown")
        if self.pcap is not None:
            self.pcap.close()


def local_port_range() -> tuple[int, int]:
    """The kernel's ephemeral port range: `-t all` leaves it alone, as passt does."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return (32768, 60999)
    return (low, high)


def flow_state(flow: Flow) -> str:
    """The state shown for any flow: TCP's derived name, SPLICED for socket-to-socket, ACTIVE otherwise."""
    if isinstance(flow, TcpConn):
        return state_name(flow.events)
    if isinstance(flow, SpliceFlow):
        return "SPLICED" if flow.pair is not None else "CONNECTING"
    return "ACTIVE"


def on_loopback(listeners: set[Listener]) -> set[Listener]:
    """-T/-U listen on the namespace's loopback: an unscoped rule becomes one per loopback address."""
    out: set[Listener] = set()
    for lst in listeners:
        if lst.bind_addr is None:
            out.add(Listener(IPv4Address("127.0.0.1"), lst.ifname, lst.port, lst.target_port))
            out.add(Listener(IPv6Address("::1"), lst.ifname, lst.port, lst.target_port))
        else:
            out.add(lst)
    return out


def raise_nofile_limit() -> None:
    """Forwarding many ports needs many descriptors: take the soft limit up to the hard one, as passt does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
