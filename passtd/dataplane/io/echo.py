"""Ping sockets for the ICMP echo flows of core/icmp.py: one per flow, opened on its first request.

The core decides which flow a request belongs to; this module owns the sockets. Every way a flow ends
(idle expiry, reset over the control API, another guest source taking its echo id over, the guest leaving,
shutdown) goes through `close_flow`, so no socket outlives its flow. A socket that cannot be opened
(ping_group_range, or no descriptor left) drops the request and its new flow, counted by reason.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Final

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.flowtable import Flow, FlowTable
from passtd.dataplane.core.icmp import EchoFlow, EchoToHost, echo_to_guest
from passtd.dataplane.core.ratelimit import Shaper
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.io.limits import is_fd_exhausted
from passtd.dataplane.io.sockets import Outbound, open_ping_socket, ping_group_hint, sockaddr
from passtd.logging import get_logger

BATCH: Final = 64

Emit = Callable[[str, Flow, str, str], None]
SendToTap = Callable[[list[bytes]], None]


class EchoSockets:
    def __init__(
        self,
        ctx: Context,
        loop: asyncio.AbstractEventLoop,
        flows: FlowTable,
        stats: Stats,
        guest: Guest,
        send_to_tap: SendToTap,
        emit: Emit,
        outbound: Outbound | None = None,
        shaper: Shaper | None = None,
    ) -> None:
        self.ctx = ctx
        self.loop = loop
        self.flows = flows
        self.stats = stats
        self.guest = guest
        self.send_to_tap = send_to_tap
        self.emit = emit
        self.outbound = outbound  # --outbound, --outbound-if4/6: as for TCP and UDP toward the network
        self.log = get_logger(component="icmp")
        self._socks: dict[int, socket.socket] = {}  # flow id -> its ping socket
        self._flows: dict[int, EchoFlow] = {}
        self._refused_logged = False
        # the guest's rate limits: the dataplane's, shared with TCP and UDP
        self.shaper = shaper if shaper is not None else Shaper()

    def __len__(self) -> int:
        """Open ping sockets."""
        return len(self._socks)

    def to_host(self, action: EchoToHost) -> None:
        """Run the core's action: close the flow it replaced, open the socket of a new flow, send."""
        if action.replaced is not None:
            self.close_flow(action.replaced, "replaced")
        flow = action.flow
        sock = self._socks.get(flow.flow_id)
        if sock is None:
            sock = self._open(flow)
            if sock is None:
                return
        shaper = self.shaper
        if shaper.egress is not None and not shaper.admit(
            shaper.egress, len(action.message), self.loop.time(), "icmp.egress"
        ):
            self.stats.drop("rate.icmp.egress")
            return
        try:
            sock.sendto(action.message, sockaddr(flow.target_addr, 0))
        except OSError as exc:
            self.stats.drop("icmp.send_error")
            self.log.debug("icmp.send.failed", flow_id=flow.flow_id, error=exc.strerror)

    def _open(self, flow: EchoFlow) -> socket.socket | None:
        try:
            sock = open_ping_socket(flow.v6, self.outbound, flow.target_addr)
        except PermissionError:
            self.stats.drop("icmp.ping_socket_forbidden")
            if not self._refused_logged:
                self._refused_logged = True
                self.log.warning("icmp.ping_socket.forbidden", hint=ping_group_hint())
            self.flows.remove(flow)
            return None
        except OSError as exc:
            self.stats.drop("fd.exhausted" if is_fd_exhausted(exc) else "icmp.ping_socket_error")
            self.log.debug("icmp.ping_socket.error", error=exc.strerror)
            self.flows.remove(flow)
            return None
        self._socks[flow.flow_id] = sock
        self._flows[flow.flow_id] = flow
        self.emit("opened", flow, "ACTIVE", "")
        self.loop.add_reader(sock.fileno(), self._on_readable, flow, sock)
        self.log.debug("icmp.flow.opened", flow_id=flow.flow_id, target=sockaddr(flow.target_addr, 0)[0])
        return sock

    def _on_readable(self, flow: EchoFlow, sock: socket.socket) -> None:
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
            ingress = self.shaper.ingress
            if ingress is not None and not self.shaper.admit(ingress, len(message), now, "icmp.ingress"):
                self.stats.drop("rate.icmp.ingress")
                continue
            frame = echo_to_guest(self.ctx, self.guest.dst_mac, flow, message, now)
            if frame is not None:
                out.append(frame)
        self.send_to_tap(out)

    def close_flow(self, flow: EchoFlow, reason: str) -> None:
        self.flows.remove(flow)
        self._flows.pop(flow.flow_id, None)
        sock = self._socks.pop(flow.flow_id, None)
        if sock is not None:
            try:
                self.loop.remove_reader(sock.fileno())
            except (ValueError, OSError):
                pass
            sock.close()
        self.emit("closed", flow, "CLOSED", reason)
        self.log.debug("icmp.flow.closed", flow_id=flow.flow_id, reason=reason)

    def expire(self, now: float, idle: float) -> None:
        for flow in [f for f in self._flows.values() if now - f.last_active > idle]:
            self.close_flow(flow, "timeout")
        # a flow whose socket could not be opened has already left the table; one whose first request is
        # still to come has no socket yet: both expire through the table walk of the core
        for flow in [f for f in self.flows if isinstance(f, EchoFlow) and now - f.last_active > idle]:
            self.close_flow(flow, "timeout")

    def close_all(self, reason: str) -> int:
        closing = [f for f in self.flows if isinstance(f, EchoFlow)]
        closing += [f for f in self._flows.values() if self.flows.by_id(f.flow_id) is not f]
        for flow in closing:
            self.close_flow(flow, reason)
        return len(closing)
