"""Socket-to-socket relay for loopback-to-loopback paths (pasta's splice bypass, and -T).

When both ends are local sockets there is no guest TCP to mirror: the two kernels' sockets are joined by
copying bytes between them, with a bounded buffer per direction, half-close relayed with shutdown(SHUT_WR)
and a reset relayed as a reset (SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.flowtable import PROTO_TCP, Flow, FlowTable, FlowTableFull, key_addr
from passtd.dataplane.core.fwd import Listener
from passtd.dataplane.core.splice import SpliceFlow
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.io.limits import is_fd_exhausted
from passtd.dataplane.io.netns import run_in_netns
from passtd.dataplane.io.sockets import reset_socket, splice_target_ns
from passtd.logging import get_logger

BUF: Final = 1 << 20


class _Direction:
    __slots__ = ("buf", "dst", "eof", "len", "pos", "src", "view", "writing")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.buf = bytearray(BUF)
        self.view = memoryview(self.buf)
        self.pos = 0  # first unsent byte
        self.len = 0  # bytes in the buffer
        self.eof = False
        self.writing = False


class SplicedPair:
    """Relays between `a` and `b` until both directions ended; calls `on_done(self, reason)` once."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        a: socket.socket,
        b: socket.socket,
        on_done: Callable[[SplicedPair, str], None],
    ) -> None:
        self.loop = loop
        self.a = a
        self.b = b
        self.on_done = on_done
        self.done = False
        self.bytes_ab = 0
        self.bytes_ba = 0
        a.setblocking(False)
        b.setblocking(False)
        self.ab = _Direction(a, b)
        self.ba = _Direction(b, a)
        loop.add_reader(a.fileno(), self._readable, self.ab)
        loop.add_reader(b.fileno(), self._readable, self.ba)

    def _readable(self, d: _Direction) -> None:
        if self.done:
            return
        if d.len == BUF:  # buffer full: wait for the writer to drain it
            self.loop.remove_reader(d.src.fileno())
            return
        try:
            n = d.src.recv_into(d.view[d.len :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish("reset", reset=True)
            return
        if n == 0:
            d.eof = True
            self.loop.remove_reader(d.src.fileno())
        else:
            d.len += n
            if d is self.ab:
                self.bytes_ab += n
            else:
                self.bytes_ba += n
        self._flush(d)

    def _flush(self, d: _Direction) -> None:
        if self.done:
            return
        while d.pos < d.len:
            try:
                sent = d.dst.send(d.view[d.pos : d.len])
            except (BlockingIOError, InterruptedError):
                if not d.writing:
                    d.writing = True
                    self.loop.add_writer(d.dst.fileno(), self._flush, d)
                return
            except OSError:
                self._finish("reset", reset=True)
                return
            d.pos += sent
        if d.writing:
            d.writing = False
            self.loop.remove_writer(d.dst.fileno())
        if d.len == BUF or d.pos == d.len:
            if d.len == BUF and not d.eof:
                self.loop.add_reader(d.src.fileno(), self._readable, d)
            d.pos = d.len = 0
        if d.eof and d.len == 0:
            try:
                d.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if self.ab.eof and self.ba.eof and self.ab.len == 0 and self.ba.len == 0:
                self._finish("fin", reset=False)

    def _finish(self, reason: str, *, reset: bool) -> None:
        if self.done:
            return
        self.done = True
        for sock in (self.a, self.b):
            try:
                self.loop.remove_reader(sock.fileno())
                self.loop.remove_writer(sock.fileno())
            except (ValueError, OSError):
                pass
            if reset:
                reset_socket(sock)
            else:
                sock.close()
        self.on_done(self, reason)

    def reset(self) -> None:
        self._finish("reset_by_api", reset=True)


class Splicer:
    """Loopback-to-loopback TCP through passtd without the tap: pasta's splice bypass (a host-loopback
    connection to a forwarded port, joined inside the namespace to its own address, or to its loopback with
    --host-lo-to-ns-lo: io/sockets.splice_target_ns) and -T (the namespace's loopback joined to the host's).
    Each joined pair is a SpliceFlow in the flow table, holding two descriptors."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        flows: FlowTable,
        stats: Stats,
        emit: Callable[[str, Flow, str, str], None],
        ctx: Context | None = None,
        guest: Guest | None = None,
        host_lo_to_ns_lo: bool = True,
    ) -> None:
        self.ctx = ctx if ctx is not None else Context()
        self.guest = guest if guest is not None else Guest()
        self.host_lo_to_ns_lo = host_lo_to_ns_lo
        self.loop = loop
        self.flows = flows
        self.stats = stats
        self.emit = emit
        self.log = get_logger(component="splice")
        self.netns_fd: int | None = None  # pasta: the namespace, where in_netns connections are made

    def on_ns_listener(self, listener: Listener, sock: socket.socket) -> None:
        """-T: a connection inside the namespace to its loopback goes to the same port on the host's."""
        now = self.loop.time()
        for _ in range(64):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.stats.drop("fd.exhausted" if is_fd_exhausted(exc) else "tcp.accept_error")
                self.log.debug("tcp.ns_accept.failed", error=exc.strerror)
                break
            self.splice(
                conn, peer, listener.target_port, in_netns=False, now=now, target=listener.target_addr
            )

    def splice(
        self, accepted: socket.socket, peer: tuple[str, int], port: int, *, in_netns: bool, now: float,
        target: IPv4Address | IPv6Address | None = None,
    ) -> None:  # fmt: skip
        """Join `accepted` to a new connection to loopback:port (inside the namespace when `in_netns`), or to
        target:port when the forwarding rule names a target address."""
        v6 = accepted.family == socket.AF_INET6
        if target is not None:
            loopback = str(target)
        elif in_netns:
            loopback = splice_target_ns(self.ctx, self.guest, v6, self.host_lo_to_ns_lo)
        else:
            loopback = "::1" if v6 else "127.0.0.1"
        family = socket.AF_INET6 if v6 else socket.AF_INET
        addr = socket.inet_pton(family, loopback)
        flow = SpliceFlow(
            self.flows.new_id(), PROTO_TCP, (PROTO_TCP, key_addr(addr), peer[1], -port), now, now,
            guest_initiated=not in_netns, host_fds=2, v6=v6, guest_addr=addr,
            guest_port=port if in_netns else peer[1], remote_addr=addr,
            remote_port=peer[1] if in_netns else port,
        )  # fmt: skip
        try:
            self.flows.add(flow)
        except FlowTableFull as exc:
            reset_socket(accepted)
            self.stats.drop(exc.reason)
            return
        try:
            if in_netns:
                assert self.netns_fd is not None
                out = run_in_netns(self.netns_fd, socket.socket, family, socket.SOCK_STREAM)
            else:
                out = socket.socket(family, socket.SOCK_STREAM)
            out.setblocking(False)
            err = out.connect_ex((loopback, port))
        except OSError as exc:
            self.flows.remove(flow)
            self.stats.drop("fd.exhausted" if is_fd_exhausted(exc) else "tcp.splice.socket_error")
            self.log.debug("tcp.splice.failed", error=exc.strerror)
            reset_socket(accepted)
            return
        if err not in (0, errno.EINPROGRESS):
            out.close()
            reset_socket(accepted)
            self.flows.remove(flow)
            self.stats.handled["tcp.splice.refused"] += 1
            return
        self.loop.add_writer(out.fileno(), self._connected, flow, accepted, out)

    def _connected(self, flow: SpliceFlow, accepted: socket.socket, out: socket.socket) -> None:
        self.loop.remove_writer(out.fileno())
        if out.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            out.close()
            reset_socket(accepted)
            self.flows.remove(flow)
            self.emit("closed", flow, "CLOSED", "connect_failed")
            return
        flow.pair = SplicedPair(self.loop, accepted, out, lambda pair, reason: self._done(flow, reason))
        self.emit("opened", flow, "SPLICED", "")

    def _done(self, flow: SpliceFlow, reason: str) -> None:
        pair = flow.pair
        if pair is not None:
            flow.bytes_from_guest, flow.bytes_to_guest = (
                (pair.bytes_ba, pair.bytes_ab) if flow.guest_initiated else (pair.bytes_ab, pair.bytes_ba)
            )
        self.flows.remove(flow)
        self.emit("closed", flow, "CLOSED", reason)

    def reset(self, flow: SpliceFlow) -> None:
        if flow.pair is not None:
            flow.pair.reset()

    def close_all(self) -> None:
        for flow in [f for f in self.flows if isinstance(f, SpliceFlow)]:
            self.reset(flow)
