"""The imperative shell: readiness → batch of frames → core → replies and socket work → flush.

`Dataplane` composes the cores and their io modules and runs the batch loop; each concern lives elsewhere:
UDP in io/udp.py (decisions in core/udp.py), ICMP echo sockets in io/echo.py, the splice bypass in
io/splice.py, listening sockets and pasta's auto scan in io/forwarding.py, the descriptor limit and its
descriptor pool in io/limits.py (shares in core/limits.py).

Dispatch is synchronous: a readiness callback takes up to `BATCH` frames, feeds them all to the core, then
writes every reply in one `send_batch`. A full batch schedules another pass at once (`call_soon`), so frames
the tap already read are never stranded waiting for new bytes, and one guest still cannot hold the loop for
more than a batch at a time. Only `MalformedFrame` is caught at the tap boundary (counted per reason, logged
at debug); any other exception is a bug and reaches the loop's exception handler.

When the guest goes away (qemu's socket closed, or the stream out of step), every flow that went through
the tap goes with it at once: TCP sockets are reset, UDP and echo sockets closed, and the count kept
(`guest.departed.flows_closed`), instead of the host sockets lingering until their activity timeouts.
"""

from __future__ import annotations

import _socket
import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from passtd.dataplane.core.context import Context, Guest, is_loopback
from passtd.dataplane.core.demux import Demux
from passtd.dataplane.core.egress import Egress, EgressPolicy
from passtd.dataplane.core.flowtable import (
    IN_TO_GUEST,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    Flow,
    FlowEvent,
    FlowTable,
    FwdTally,
)
from passtd.dataplane.core.fwd import ForwardTables, Listener
from passtd.dataplane.core.icmp import EchoFlow, EchoToHost
from passtd.dataplane.core.limits import GUEST_ADDRS_MAX, FdPool, Limits, Usage
from passtd.dataplane.core.ratelimit import RateSpec, Shaper
from passtd.dataplane.core.services.ndp import NdpResponder
from passtd.dataplane.core.splice import SpliceFlow
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.tcp.handler import TcpEnv, TcpHandler, TcpHooks
from passtd.dataplane.core.tcp.states import state_name
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.core.udp import UdpFlow
from passtd.dataplane.io.echo import EchoSockets
from passtd.dataplane.io.forwarding import Forwarding
from passtd.dataplane.io.limits import SpareFd, fd_pool, follow_limit, is_fd_exhausted
from passtd.dataplane.io.listeners import BindResult
from passtd.dataplane.io.pcap import PcapWriter
from passtd.dataplane.io.sockets import BacklogProbe, HostSockets, Outbound, accept_fd
from passtd.dataplane.io.splice import Splicer
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
        self.fd_pool: FdPool = fd_pool()  # raises RLIMIT_NOFILE to the hard limit first
        self.flows = FlowTable(max_flows, self.fd_pool)
        self.ndp = NdpResponder(ctx)
        self.timeouts = Timeouts()
        self._out: list[OutFrame] = []
        self.tcp_io = TcpIo()
        self.watchers: list[Callable[[FlowEvent], None]] = []
        self.egress = Egress()  # shared by the TCP, UDP and echo paths; swapped by `set_egress`
        self.egress.on_denied = self._on_egress_denied
        self.shaper = Shaper()  # rate limits (core/ratelimit.py): one object shared by TCP, UDP and ICMP
        self.tcp = TcpHandler(
            TcpEnv(ctx, self.guest, self.flows, self.stats, self.tcp_io, self._to_tap, os.urandom(16),
                   self.egress),
            TcpHooks(self.timeouts, on_close=self._on_tcp_close, on_state=self._on_tcp_state,
                     watching=self.watchers, offload=vnet, congested=self._tap_congested,
                     shaper=self.shaper),
        )  # fmt: skip
        self._out_bytes = 0
        self._eth_mac: bytes | None = b""  # guest MAC the cached Ethernet headers were made for
        self._eth: dict[int, bytes] = {}
        self._vnet: dict[tuple[bool, int, int], bytes] = {}
        self._resume_scheduled = False
        self._tap_pass_scheduled = False
        self.tcp_io.on_connected = lambda conn: self.tcp.sock_connected(conn, self.loop.time())
        self.tcp_io.on_error = lambda conn, reason: self.tcp.sock_error(conn, reason, self.loop.time())
        self.tcp_io.on_readable = lambda conn, eof: self.tcp.sock_readable(conn, self.loop.time(), eof)
        self.tcp_io.on_writable = lambda conn: self.tcp.sock_writable(conn, self.loop.time())
        self.loop.add_reader(self.tcp_io.fileno(), self._on_tcp_events)
        self._timer = DeadlineTimer(loop, self._on_tcp_timer)
        self.udp = UdpRelay(
            ctx, loop, self.flows, self.stats, self.guest, self._to_tap, self._after_batch, self._emit,
            self.log, to_tap_vnet=self._to_tap_vnet if vnet else None, egress=self.egress, shaper=self.shaper,
        )  # fmt: skip
        hs = self.host_sockets = sockets if sockets is not None else HostSockets()
        outbound = Outbound(hs.outbound, hs.outbound_if4, hs.outbound_if6)
        self.tcp_io.outbound = self.udp.outbound = outbound
        self.echo = EchoSockets(
            ctx, loop, self.flows, self.stats, self.guest, self.send_to_tap, self._emit, outbound, self.shaper
        )
        self.splicer = Splicer(loop, self.flows, self.stats, self._emit, ctx, self.guest, hs.host_lo_to_ns_lo)
        self.demux = Demux(
            ctx,
            self.guest,
            self.stats,
            self.flows,
            self.ndp,
            self.tcp.tap_segment,
            self.udp.from_guest,
            self.egress,
        )
        self.forwarding = Forwarding(
            loop, self.fd_pool, self._on_tcp_listener, self.udp.on_listener,
            self.splicer.on_ns_listener, self.udp.on_ns_listener,
            freebind=hs.freebind, tcp=ctx.tcp, udp=ctx.udp,
        )  # fmt: skip
        self._backlog = BacklogProbe()  # asks whether a listener has more queued before accept() again
        self._spare = SpareFd()  # lets accept() shed a connection at EMFILE instead of spinning
        self.tap: TapBackend | None = None
        self.disconnected: asyncio.Event = asyncio.Event()
        self._tick: asyncio.TimerHandle | None = None

    @property
    def netns_fd(self) -> int | None:
        """pasta: the namespace, for -T/-U, `auto` and spliced loopback paths."""
        return self.forwarding.netns_fd

    @netns_fd.setter
    def netns_fd(self, fd: int | None) -> None:
        self.forwarding.netns_fd = self.splicer.netns_fd = fd

    @property
    def forward(self) -> ForwardTables:
        return self.forwarding.tables

    @property
    def limits(self) -> Limits:
        """The caps and what is in use now (core/limits.py), for the control plane's status."""
        flows, guest, pool = self.flows, self.guest, self.fd_pool
        refused = dict(flows.refused)
        for reason in ("limit.guest_addresses", "fd.exhausted"):
            if self.stats.dropped[reason]:
                refused[reason] = self.stats.dropped[reason]
        return Limits(
            open_files=pool.open_files,
            fds_reserved=pool.reserved,
            flow_fds=Usage(flows.max_fds, flows.fds),
            flows=Usage(flows.max_flows, len(flows)),
            tcp=Usage(flows.cap(PROTO_TCP), flows.count(PROTO_TCP)),
            udp=Usage(flows.cap(PROTO_UDP), flows.count(PROTO_UDP)),
            icmp=Usage(flows.cap(PROTO_ICMP), flows.count(PROTO_ICMP)),
            listeners=Usage(pool.listeners + pool.listener_room(), pool.listeners),
            guest_addresses4=Usage(GUEST_ADDRS_MAX, len(guest.addrs4)),
            guest_addresses6=Usage(GUEST_ADDRS_MAX, len(guest.addrs6)),
            refused=refused,
        )

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

    def _guest_departed(self) -> None:
        """The guest is gone (qemu's socket closed or out of step): so is its side of every flow through the
        tap. Reset the host sockets now rather than leave them to the activity timeouts."""
        self.detach()
        closed = 0
        for flow in self.flows:
            if isinstance(flow, TcpConn):
                self.tcp.reset(flow, "guest_departed")
                closed += 1
            elif isinstance(flow, UdpFlow) and flow.back is None:
                self.udp.close_flow(flow, "guest_departed")
                closed += 1
        closed += self.echo.close_all("guest_departed")
        self.stats.handled["guest.departed.flows_closed"] += closed
        self.log.info("guest.departed", flows_closed=closed)
        self._after_batch(self.loop.time())

    def _on_tap_readable(self) -> None:
        tap = self.tap
        if tap is None:
            return
        try:
            frames = tap.recv_batch(BATCH)
        except MalformedFrame as exc:
            self.stats.drop(exc.reason)
            self.log.warning("tap.stream.desync", reason=exc.reason)
            self._guest_departed()
            return
        except EOFError:
            self._guest_departed()
            return
        if not frames:
            return
        if len(frames) >= BATCH and not self._tap_pass_scheduled:
            # More may be waiting in the back-end's buffer, already read from the kernel: the descriptor
            # would not poll readable for them. Another pass right after this one, other callbacks between.
            self._tap_pass_scheduled = True
            self.loop.call_soon(self._tap_pass)
        now = self.loop.time()
        replies: list[bytes] = []  # ARP, DHCP, NDP answers (the flows' frames go through _to_tap)
        actions: list[EchoToHost] = []
        stats = self.stats
        stats.frames_from_tap += len(frames)
        stats.bytes_from_tap += sum(map(len, frames))
        pcap = self.pcap
        demux = self.demux  # `demux.handle_frame(...)` is a direct native call (a bound method is not)
        udp = self.udp
        udp.begin_batch(len(frames))
        try:
            for frame in frames:
                if pcap is not None:
                    pcap.write(frame)
                try:
                    demux.handle_frame(frame, now, replies, actions)
                except MalformedFrame as exc:
                    stats.drop(exc.reason)
                    self.log.debug("tap.frame.dropped", reason=exc.reason, length=len(frame))
        finally:
            self.tcp.flush_tx()  # guest data views the frames' buffers: written before the next read
            udp.end_batch()  # datagrams gathered from this batch, in one send per run
        for reply in replies:
            self._out.append(reply)
            self._out_bytes += len(reply)
        for action in actions:
            self.echo.to_host(action)
        self._after_batch(now)

    def _tap_pass(self) -> None:
        self._tap_pass_scheduled = False
        self._on_tap_readable()

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
        self._emit("closed", conn, "CLOSED", reason)  # logged with both sides at -d by the flow log watcher

    def _on_tcp_state(self, conn: TcpConn, before: str, after: str) -> None:
        self._emit("opened" if before == "CLOSED" else "state", conn, after)

    def _emit(self, kind: str, flow: Flow, state: str, reason: str = "") -> None:
        if self.watchers:
            event = FlowEvent(kind, flow, state, reason, self.loop.time())
            for watcher in list(self.watchers):
                watcher(event)

    def _on_egress_denied(self, flow: Flow, reason: str) -> None:
        self._emit("denied", flow, "DENIED", reason)

    # -- control ---------------------------------------------------------------------------------------------

    def set_egress(self, policy: EgressPolicy, reset_existing: bool = False) -> int:
        """Swap the egress rules (new flows see the old list or this one, never a mix); with `reset_existing`,
        close the guest-initiated flows this list denies (TCP: RST both sides; UDP and echo: closed), counted
        and returned. Flows of the -T/-U loopback forwards are never the guest's egress and stay."""
        egress = self.egress
        egress.set(policy)
        if not reset_existing or egress.policy is None:
            return 0
        denied = [
            f for f in self.flows
            if f.guest_initiated and isinstance(f, (TcpConn, UdpFlow, EchoFlow))
            and not (isinstance(f, UdpFlow) and f.back is not None)
            and egress.would_deny(f.proto, f.remote_addr, f.remote_port)
        ]  # fmt: skip
        for flow in denied:
            self.reset_flow(flow.flow_id, "egress_denied")
        egress.reset_flows += len(denied)
        return len(denied)

    def set_rate_limits(self, egress: RateSpec | None, ingress: RateSpec | None) -> None:
        """Replace the guest's rate limits (None: unlimited). TCP flows held for tokens are woken at once, so
        a raised or cleared limit applies now rather than at their next timer."""
        now = self.loop.time()
        self.shaper.configure(egress, ingress, now)
        self.tcp.rate_changed(now)
        self._after_batch(now)

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
            self.echo.close_flow(flow, reason)
        elif isinstance(flow, UdpFlow):
            self.udp.close_flow(flow, reason)
        elif isinstance(flow, SpliceFlow) and flow.pair is not None:
            self.splicer.reset(flow)
        elif flow is not None:
            self.flows.remove(flow)
            self._emit("closed", flow, "CLOSED", reason)
        self._after_batch(self.loop.time())
        return flow

    def set_forwarding(self, tables: ForwardTables) -> list[BindResult]:
        """Replace the port policy: diff the listeners, report each bind; flows are never touched. Binds all
        at once (start-up, SIGHUP); the descriptor pool bounds how many that can be."""
        return self.forwarding.apply(tables)

    async def set_forwarding_async(self, tables: ForwardTables) -> list[BindResult]:
        """As `set_forwarding`, binding in slices with the data path running between them (control API)."""
        return await self.forwarding.apply_async(tables)

    def _on_tcp_listener(self, listener: Listener, sock: socket.socket) -> None:
        self.accept_tcp(sock, listener.target_port, listener.target_addr, listener.tally)

    def accept_tcp(
        self, listener: socket.socket, guest_port: int, target: IPv4Address | IPv6Address | None = None,
        tally: FwdTally | None = None,
    ) -> None:  # fmt: skip
        """A forwarded port is readable: accept every pending connection and offer each to the guest (at
        `target`, the rule's target address, when it has one); each counts in its rule's `tally`."""
        now = self.loop.time()
        probe = self._backlog
        offered = False  # a connection went to the TCP core (not only splices): it has frames and timers
        for i in range(64):
            if i and not probe.pending(listener.fileno()):
                break  # the backlog is empty: no accept() failing with EAGAIN, no exception
            try:
                fd, peer = accept_fd(listener)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if is_fd_exhausted(exc):
                    # The connection stays queued and the listener readable: shed it, or the loop spins.
                    self.stats.drop("fd.exhausted")
                    self._spare.shed(listener)
                else:
                    self.log.warning("tcp.accept.failed", error=exc.strerror)
                break
            family = socket.AF_INET6 if len(peer) == 4 else socket.AF_INET
            addr = socket.inet_pton(family, peer[0])
            if self.netns_fd is not None and self.host_sockets.splice and is_loopback(addr):
                self.splicer.splice(
                    _socket.socket(family, socket.SOCK_STREAM, 0, fd), peer, guest_port, in_netns=True,
                    now=now, target=target, tally=tally,
                )  # fmt: skip
                continue  # the splice bypass
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            offered = True
            port = self.tcp_io.adopt(sock)
            conn = self.tcp.accepted(
                port, addr, peer[1], guest_port, now, b"" if target is None else target.packed
            )
            if conn is not None:
                if tally is not None:
                    tally.connections += 1
                    tally.attach(conn, IN_TO_GUEST)
                self.tcp_io.bind(conn)
                self.log.debug("tcp.flow.accepted", flow_id=conn.flow_id, peer=peer[0], port=peer[1])
        if offered:  # splices alone leave the TCP core as the last callback's _after_batch left it
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

    # -- timers ---------------------------------------------------------------------------------------------

    def _on_tick(self) -> None:
        now = self.loop.time()
        self._tick = self.loop.call_later(TICK, self._on_tick)
        if self.tap is not None and now >= self.ndp.next_deadline():
            ra = self.ndp.handle_timer(self.guest.mac, now)
            if ra is not None:
                self.send_to_tap([ra])
        self.udp.expire(now, self.timeouts.udp_idle)
        self.echo.expire(now, self.timeouts.icmp_idle)
        if follow_limit(self.fd_pool):
            self.log.info("limits.nofile.changed", open_files=self.fd_pool.open_files)
        if self.pcap is not None:
            self.pcap.flush()
        if self.netns_fd is not None:
            self.forwarding.auto_scan()

    def close(self) -> None:
        for conn in [f for f in self.flows if isinstance(f, TcpConn)]:
            self.tcp.reset(conn, "shutdown")
        self._after_batch(self.loop.time())
        self._timer.cancel()
        self.loop.remove_reader(self.tcp_io.fileno())
        self.tcp_io.close()
        self.forwarding.close()
        self.splicer.close_all()
        self.udp.close()
        self.detach()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self.echo.close_all("shutdown")
        if self.pcap is not None:
            self.pcap.close()
        self._spare.close()


def flow_state(flow: Flow) -> str:
    """The state shown for any flow: TCP's derived name, SPLICED for socket-to-socket, ACTIVE otherwise."""
    if isinstance(flow, TcpConn):
        return state_name(flow.events)
    if isinstance(flow, SpliceFlow):
        return "SPLICED" if flow.pair is not None else "CONNECTING"
    return "ACTIVE"
