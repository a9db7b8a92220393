"""Socket-to-socket relay for loopback-to-loopback paths (pasta's splice bypass, and -T).

When both ends are local sockets there is no guest TCP to mirror: the two kernels' sockets are joined by
copying bytes between them, with a bounded buffer per direction, half-close relayed with shutdown(SHUT_WR)
and a reset relayed as a reset (SO_LINGER 0).

What a connection costs is kept to its own sockets: the namespace-side socket comes ready from a pool made
in the namespace ahead of time (io/netns.py `NsSocketPool`, refilled in batches by a worker thread that
stays in the namespace, never a thread or a setns per connection), and a direction holds a relay buffer
only while it has bytes in flight (`BufferPool`), so neither a new connection nor an idle one allocates or
zero-fills a megabyte.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import select
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from passtd.dataplane.core.context import Context, Guest
from passtd.dataplane.core.flowtable import (
    IN_FROM_GUEST,
    IN_TO_GUEST,
    PROTO_TCP,
    Flow,
    FlowTable,
    FlowTableFull,
    FwdTally,
    key_addr,
)
from passtd.dataplane.core.fwd import Listener
from passtd.dataplane.core.splice import SpliceFlow
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.io.limits import is_fd_exhausted
from passtd.dataplane.io.netns import NsSocketPool, run_in_netns
from passtd.dataplane.io.sockets import BacklogProbe, accept_fd, reset_socket, splice_target_ns
from passtd.logging import get_logger

BUF: Final = 1 << 20
BUF_KEEP: Final = 8  # idle relay buffers kept for reuse (8 MiB at most)
NS_POOL_MAX: Final = 16  # pooled namespace sockets per family, at most
NS_POOL_RESERVE_SHARE: Final = 8  # ... and at most reserved/8 per family: both families take a quarter
_STREAM: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_LOOPBACK: Final[dict[int, str]] = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
_LOOPBACK_PACKED: Final[dict[int, bytes]] = {f: socket.inet_pton(f, addr) for f, addr in _LOOPBACK.items()}


class BufferPool:
    """Relay buffers, taken when a direction reads and given back once it has written everything out.

    A buffer is held only while bytes wait to be sent, so a request/response connection reuses the same
    one or two buffers, and an idle connection holds none. Kept as memoryviews (never resized)."""

    __slots__ = ("free", "keep", "made", "size")

    def __init__(self, size: int = BUF, keep: int = BUF_KEEP) -> None:
        self.size = size
        self.keep = keep
        self.free: list[memoryview] = []
        self.made = 0  # buffers allocated so far

    def get(self) -> memoryview:
        if self.free:
            return self.free.pop()
        self.made += 1
        return memoryview(bytearray(self.size))

    def put(self, view: memoryview) -> None:
        if len(self.free) < self.keep:
            self.free.append(view)


_EMPTY: Final = memoryview(b"")
_DONTWAIT: Final = socket.MSG_DONTWAIT


class _Direction:
    __slots__ = ("dst", "dst_fd", "eof", "len", "pos", "reading", "src", "src_fd", "view", "writing")

    def __init__(self, src: _socket.socket, dst: _socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.view = _EMPTY  # a pooled buffer while bytes are in flight
        self.pos = 0  # first unsent byte
        self.len = 0  # bytes in the buffer
        self.eof = False
        self.reading = True  # registered with the loop: only what is registered is unregistered at the end
        self.writing = False


_IN: Final = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_OUT: Final = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class SplicePoller:
    """One epoll for every spliced socket, watched by the loop as a single reader.

    Registering a new descriptor with uvloop (add_reader) costs five to seven syscalls (libuv probes the
    descriptor with an epoll ADD and DEL, sets O_NONBLOCK again, and removes it with three DELs); here a
    socket costs one epoll_ctl when it is first watched and none when it is closed (the kernel drops a
    closed descriptor from the epoll set)."""

    __slots__ = ("ep", "loop", "masks", "watched")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.masks: dict[int, int] = {}  # fd -> events registered
        self.watched: dict[int, tuple[SplicedPair, _Direction, _Direction]] = {}  # fd -> pair, reader, writer
        loop.add_reader(self.ep.fileno(), self._poll)

    def watch(self, fd: int, pair: SplicedPair, reader: _Direction, writer: _Direction) -> None:
        self.watched[fd] = (pair, reader, writer)
        self.set(fd, select.EPOLLIN)

    def set(self, fd: int, mask: int) -> None:
        """Watch `fd` for `mask`; nothing (0) unregisters it, as HUP and ERR are reported even then."""
        current = self.masks.get(fd, 0)
        if mask == current:
            return
        if current == 0:
            self.ep.register(fd, mask)
        elif mask == 0:
            self.ep.unregister(fd)
        else:
            self.ep.modify(fd, mask)
        if mask:
            self.masks[fd] = mask
        else:
            del self.masks[fd]

    def forget(self, fd: int) -> None:
        """Before `fd` is closed: the close takes it out of the epoll set."""
        self.masks.pop(fd, None)
        self.watched.pop(fd, None)

    def _poll(self) -> None:
        try:
            events = self.ep.poll(0, 256)
        except InterruptedError:
            return
        watched = self.watched
        for fd, ev in events:
            entry = watched.get(fd)
            if entry is None:
                continue
            pair, reader, writer = entry
            if ev & _IN and reader.reading:
                pair._readable(reader)
            if ev & _OUT and writer.writing:
                pair._flush(writer)

    def close(self) -> None:
        self.loop.remove_reader(self.ep.fileno())
        self.ep.close()


class SplicedPair:
    """Relays between `a` and `b` until both directions ended; calls `on_done(self, reason)` once.

    Every read and write passes MSG_DONTWAIT, so a socket may be left blocking: accept() cannot ask for
    SOCK_NONBLOCK from Python, and making the accepted socket non-blocking was an ioctl per connection. They
    are of the C type `_socket.socket` (`socket.socket` is a subclass): its `family` and `close` are C code,
    where `socket.socket`'s are interpreted."""

    __slots__ = ("a", "ab", "b", "ba", "buffers", "bytes_ab", "bytes_ba", "done", "loop", "on_done", "poller")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        a: _socket.socket,
        b: _socket.socket,
        on_done: Callable[[SplicedPair, str], None],
        poller: SplicePoller,
        buffers: BufferPool | None = None,
    ) -> None:
        self.loop = loop
        self.a = a
        self.b = b
        self.on_done = on_done
        self.buffers = BufferPool() if buffers is None else buffers
        self.done = False
        self.bytes_ab = 0
        self.bytes_ba = 0
        self.poller = poller
        self.ab = ab = _Direction(a, b)
        self.ba = ba = _Direction(b, a)
        poller.watch(ab.src_fd, self, ab, ba)
        poller.watch(ba.src_fd, self, ba, ab)

    def _events(self, fd: int) -> None:
        """Tell the poller what `fd` waits for now: reading for the direction it feeds, writing for the
        direction it drains."""
        ab, ba = self.ab, self.ba
        if fd == ab.src_fd:
            mask = (select.EPOLLIN if ab.reading else 0) | (select.EPOLLOUT if ba.writing else 0)
        else:
            mask = (select.EPOLLIN if ba.reading else 0) | (select.EPOLLOUT if ab.writing else 0)
        self.poller.set(fd, mask)

    def _readable(self, d: _Direction) -> None:
        if self.done:
            return
        view = d.view
        if d.len == len(view):
            if view:  # buffer full: wait for the writer to drain it
                d.reading = False
                self._events(d.src_fd)
                return
            view = d.view = self.buffers.get()
        try:
            n = d.src.recv_into(view[d.len :], 0, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._release(d)
            return
        except OSError:
            self._finish("reset", reset=True)
            return
        if n == 0:
            d.eof = True
            d.reading = False
            self._flush(d)
            if not self.done:  # the second end of file closes the pair, and the close unwatches: no epoll_ctl
                self._events(d.src_fd)
            return
        d.len += n
        if d is self.ab:
            self.bytes_ab += n
        else:
            self.bytes_ba += n
        self._flush(d)

    def _release(self, d: _Direction) -> None:
        """Give the buffer back once everything read was sent: only bytes in flight hold one."""
        if d.pos == d.len and d.view:
            self.buffers.put(d.view)
            d.view = _EMPTY
            d.pos = d.len = 0

    def _flush(self, d: _Direction) -> None:
        if self.done:
            return
        while d.pos < d.len:
            try:
                sent = d.dst.send(d.view[d.pos : d.len], _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                if not d.writing:
                    d.writing = True
                    self._events(d.dst_fd)
                return
            except OSError:
                self._finish("reset", reset=True)
                return
            d.pos += sent
        if d.writing:
            d.writing = False
            self._events(d.dst_fd)
        if d.view:
            full = d.len == len(d.view)
            self._release(d)
            if full and not d.eof and not d.reading:
                d.reading = True
                self._events(d.src_fd)
        if d.eof:
            if self.ab.eof and self.ba.eof and self.ab.len == 0 and self.ba.len == 0:
                # both ends said all: close() sends the FIN a shutdown would (nothing is left unread, so
                # no RST), one system call fewer per connection
                self._finish("fin", reset=False)
                return
            try:
                d.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _finish(self, reason: str, *, reset: bool) -> None:
        if self.done:
            return
        self.done = True
        self.poller.forget(self.ab.src_fd)
        self.poller.forget(self.ba.src_fd)
        for sock in (self.a, self.b):
            if reset:
                reset_socket(sock)
            else:
                sock.close()
        for d in (self.ab, self.ba):
            if d.view:  # bytes still in it are dropped with the connection
                self.buffers.put(d.view)
                d.view = _EMPTY
        self.on_done(self, reason)

    def reset(self) -> None:
        self._finish("reset_by_api", reset=True)


class Splicer:
    """Loopback-to-loopback TCP through passtd without the tap: pasta's splice bypass (a host-loopback
    connection to a forwarded port, joined inside the namespace to its own address, or to its loopback with
    --host-lo-to-ns-lo: io/sockets.splice_target_ns) and -T (the namespace's loopback joined to the host's).
    Each joined pair is a SpliceFlow in the flow table, holding two descriptors.

    Namespace-side sockets come from `ns_pool` (made in the namespace in batches); when it is empty the
    socket is made the slow way, with a helper thread, so a burst larger than the pool is slower, not
    refused."""

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
        self.buffers = BufferPool()
        self.poller: SplicePoller | None = None  # made with the first pair
        self.ns_pool: NsSocketPool | None = None
        self._netns_fd: int | None = None
        self._pool_failures = 0
        self._backlog = BacklogProbe()
        self.pool_misses = 0  # namespace sockets made the slow way because the pool was empty
        # family -> (context net, guest address set, its size, target text, packed): see _ns_target
        self._targets: dict[int, tuple[object, object, int, str, bytes]] = {}
        pool = flows.pool
        reserved = pool.reserved if pool is not None else NS_POOL_MAX * NS_POOL_RESERVE_SHARE
        self.ns_pool_size = min(NS_POOL_MAX, reserved // NS_POOL_RESERVE_SHARE)

    @property
    def netns_fd(self) -> int | None:
        """pasta: the namespace, where in_netns connections are made. Setting it starts a fresh socket pool
        there (stocked per family after that family's first spliced connection) and closes the old one."""
        return self._netns_fd

    @netns_fd.setter
    def netns_fd(self, fd: int | None) -> None:
        if fd == self._netns_fd:
            return
        if self.ns_pool is not None:
            self.ns_pool.close()
            self.ns_pool = None
        self._netns_fd = fd
        self._pool_failures = 0
        if fd is not None and self.ns_pool_size > 0:
            self.ns_pool = NsSocketPool(fd, self.ns_pool_size)

    def _ns_socket(self, family: int) -> _socket.socket:
        pool = self.ns_pool
        if pool is not None:
            if pool.failures != self._pool_failures:
                self._pool_failures = pool.failures
                self.stats.drop("tcp.splice.pool_refill_failed")
                self.log.debug("tcp.splice.pool_refill_failed", error=pool.last_error)
            # the pool's list itself, not its (interpreted) methods, while it holds sockets of this family
            free = pool.free.get(family)
            if free:
                sock = free.pop()
                if len(free) <= pool.size // 2 and not pool.pending:
                    pool.refill_soon(self.loop)
                return sock
            taken = pool.take(family)
            if pool.low():
                pool.refill_soon(self.loop)
            if taken is not None:
                return taken
        self.pool_misses += 1
        assert self._netns_fd is not None
        return run_in_netns(self._netns_fd, _socket.socket, family, _STREAM)

    def _ns_target(self, family: int) -> tuple[str, bytes]:
        """splice_target_ns for `family`, text and packed, worked out again only when what it depends on
        changed: the context's address (replaced, not mutated) or the guest's learned addresses (a set that
        only grows, core/demux.py). Per connection, sorting them and ipaddress's interpreted str() cost
        more than the rest of the join."""
        v6 = family == socket.AF_INET6
        net: object = self.ctx.ip6 if v6 else self.ctx.ip4
        seen: object = self.guest.addrs6 if v6 else self.guest.addrs4
        size = len(self.guest.addrs6 if v6 else self.guest.addrs4)
        hit = self._targets.get(family)
        if hit is not None and hit[0] is net and hit[1] is seen and hit[2] == size:
            return hit[3], hit[4]
        text = splice_target_ns(self.ctx, self.guest, v6, False)
        packed = socket.inet_pton(family, text)
        self._targets[family] = (net, seen, size, text, packed)
        return text, packed

    def on_ns_listener(self, listener: Listener, sock: socket.socket) -> None:
        """-T: a connection inside the namespace to its loopback goes to the same port on the host's."""
        now = self.loop.time()
        probe = self._backlog
        for i in range(64):
            if i and not probe.pending(sock.fileno()):
                break  # the backlog is empty (io/sockets.py BacklogProbe)
            try:
                fd, peer = accept_fd(sock)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.stats.drop("fd.exhausted" if is_fd_exhausted(exc) else "tcp.accept_error")
                self.log.debug("tcp.ns_accept.failed", error=exc.strerror)
                break
            family = socket.AF_INET6 if len(peer) == 4 else socket.AF_INET
            conn = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            self.splice(
                conn, peer, listener.target_port, in_netns=False, now=now, target=listener.target_addr,
                tally=listener.tally,
            )  # fmt: skip

    def splice(
        self, accepted: _socket.socket, peer: tuple[str, int] | tuple[str, int, int, int], port: int, *,
        in_netns: bool, now: float,
        target: IPv4Address | IPv6Address | None = None, tally: FwdTally | None = None,
    ) -> None:  # fmt: skip
        """Join `accepted` to a new connection to loopback:port (inside the namespace when `in_netns`), or to
        target:port when the forwarding rule names a target address; `tally`: the rule's counters. `peer` as
        accept() gives it, a 4-tuple for IPv6 (compiled, the annotation is checked)."""
        family = accepted.family
        if target is not None:
            loopback = str(target)
            addr = target.packed
        elif in_netns and not self.host_lo_to_ns_lo:  # the namespace's own address (passt fwd.c)
            loopback, addr = self._ns_target(family)
        else:
            loopback = _LOOPBACK[family]
            addr = _LOOPBACK_PACKED[family]
        flow = SpliceFlow(
            self.flows.new_id(), PROTO_TCP, (PROTO_TCP, key_addr(addr), peer[1], -port), now, now,
            guest_initiated=not in_netns, host_fds=2, v6=family == socket.AF_INET6, guest_addr=addr,
            guest_port=port if in_netns else peer[1], remote_addr=addr,
            remote_port=peer[1] if in_netns else port,
        )  # fmt: skip
        try:
            self.flows.add(flow)
        except FlowTableFull as exc:
            reset_socket(accepted)
            self.stats.drop(exc.reason)
            return
        if tally is not None:  # the accepted side is the client: in is a→b (from guest for -t, to it for -T)
            tally.connections += 1
            tally.attach(flow, IN_FROM_GUEST if in_netns else IN_TO_GUEST)
        try:
            out = self._ns_socket(family) if in_netns else _socket.socket(family, _STREAM)
            err = out.connect_ex((loopback, port))
        except OSError as exc:
            self.flows.remove(flow)
            self.stats.drop("fd.exhausted" if is_fd_exhausted(exc) else "tcp.splice.socket_error")
            self.log.debug("tcp.splice.failed", error=exc.strerror)
            reset_socket(accepted)
            return
        if err == errno.EINPROGRESS:
            # on loopback the handshake has usually completed inside connect(): a second connect() says so
            # (EISCONN) and saves the writer registration and a trip through the loop
            err = out.connect_ex((loopback, port))
            if err == errno.EISCONN:
                err = 0
            elif err in (errno.EALREADY, errno.EINPROGRESS):
                self.loop.add_writer(out.fileno(), self._connected, flow, accepted, out)
                return
        if err != 0:
            out.close()
            reset_socket(accepted)
            self.flows.remove(flow)
            self.stats.handled["tcp.splice.refused"] += 1
            return
        self._join(flow, accepted, out)

    def _connected(self, flow: SpliceFlow, accepted: _socket.socket, out: _socket.socket) -> None:
        self.loop.remove_writer(out.fileno())
        if out.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            out.close()
            reset_socket(accepted)
            self.flows.remove(flow)
            self.emit("closed", flow, "CLOSED", "connect_failed")
            return
        self._join(flow, accepted, out)

    def _join(self, flow: SpliceFlow, accepted: _socket.socket, out: _socket.socket) -> None:
        poller = self.poller
        if poller is None:
            poller = self.poller = SplicePoller(self.loop)
        flow.pair = SplicedPair(
            self.loop, accepted, out, lambda pair, reason: self._done(flow, reason), poller, self.buffers
        )
        self.emit("opened", flow, "SPLICED", "")

    def _done(self, flow: SpliceFlow, reason: str) -> None:
        flow.bytes_from_guest, flow.bytes_to_guest = flow.byte_counts()
        self.flows.remove(flow)
        self.emit("closed", flow, "CLOSED", reason)

    def reset(self, flow: SpliceFlow) -> None:
        if flow.pair is not None:
            flow.pair.reset()

    def close_all(self) -> None:
        for flow in [f for f in self.flows if isinstance(f, SpliceFlow)]:
            self.reset(flow)
        if self.ns_pool is not None:
            self.ns_pool.close()
        if self.poller is not None:
            self.poller.close()
            self.poller = None
