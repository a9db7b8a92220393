"""Host TCP sockets for the TCP core: the real `SockPort`, and edge-triggered readiness through one epoll.

Why epoll and not `loop.add_reader` per socket: data toward the guest stays in the socket until the guest
acknowledges it (it is only peeked), so a level-triggered reader would fire forever. With EPOLLET the core
hears about new data once, and otherwise re-peeks when the guest's ACKs open the window. The epoll fd itself
is watched by the event loop, so one callback serves every TCP socket and drains all their events in a batch.
"""

from __future__ import annotations

import _socket
import errno
import select
import socket
import struct
from collections.abc import Callable
from typing import Final

from passtd.dataplane.core.tcp import states as st
from passtd.dataplane.core.tcp.conn import TcpConn, TcpInfo
from passtd.dataplane.io.sockets import Outbound, errno_name, reset_socket, sockaddr

SO_PEEK_OFF: Final = 42
TCP_INFO_LEN: Final = 232
_TCPI_U32: Final = struct.Struct("=I")
_TCPI_U64: Final = struct.Struct("=Q")
# tcpi_rtt (offset 68), tcpi_total_retrans (100), tcpi_bytes_acked (120), tcpi_snd_wnd (228)
_TCPI_ALL: Final = struct.Struct("=68xI28xI16xQ100xI")
BUF_SIZE: Final = 1 << 20
IOV_MAX: Final = 1024  # chunks per sendmsg (Linux UIO_MAXIOV); the rest is then "not taken", and resent
EV_CONNECTING: Final = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
EV_ESTABLISHED: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
MAX_EVENTS: Final = 256
# Module constants, not `select.X` / `socket.X`: compiled code looks an attribute of another module up at
# every use (a dict lookup through the module object), and these are read per event.
_EPOLLIN: Final = select.EPOLLIN
_EPOLLOUT: Final = select.EPOLLOUT
_EPOLLERR: Final = select.EPOLLERR
_EPOLLHUP: Final = select.EPOLLHUP
_EPOLLRDHUP: Final = select.EPOLLRDHUP
_MSG_PEEK: Final = socket.MSG_PEEK
_MSG_TRUNC: Final = socket.MSG_TRUNC
_MSG_MORE: Final = socket.MSG_MORE
_SOL_SOCKET: Final = socket.SOL_SOCKET
_IPPROTO_TCP: Final = socket.IPPROTO_TCP
_TCP_INFO: Final = socket.TCP_INFO
_SO_SNDBUF: Final = socket.SO_SNDBUF
_TCP_WINDOW_CLAMP: Final = socket.TCP_WINDOW_CLAMP
_TCP_MAXSEG: Final = socket.TCP_MAXSEG
_SO_ERROR: Final = socket.SO_ERROR

ARENA_SIZE: Final = 4 << 20  # a batch toward the guest stops at 2 MiB queued (dataplane), plus one chunk
_scratch = memoryview(bytearray(BUF_SIZE))  # target of MSG_TRUNC discards: nothing is copied into it
_fallback = memoryview(bytearray(0))  # peeks from the start of the queue, without SO_PEEK_OFF (grows)


class PeekArena:
    """Where peeked data lands. Every peek of a batch gets its own region, so the frames built from it can
    point into it instead of copying the payload; the dataplane calls `reset` once the batch is written (a
    tap write is synchronous, and frames that would be queued are copies: see Dataplane._to_tap)."""

    __slots__ = ("size", "used", "view")

    def __init__(self, size: int = ARENA_SIZE) -> None:
        self.view = memoryview(bytearray(size))
        self.size = size
        self.used = 0

    def region(self, size: int) -> memoryview:
        """Room for `size` bytes: from the arena while it lasts, else a buffer of its own (still valid)."""
        start = self.used
        if start + size <= self.size:
            return self.view[start : start + size]
        return memoryview(bytearray(size))

    def keep(self, region: memoryview, n: int) -> None:
        """The first `n` bytes of `region` stay in use until `reset`."""
        if region.obj is self.view.obj:
            self.used += n

    def reset(self) -> None:
        self.used = 0


def probe_peek_off() -> bool:
    """SO_PEEK_OFF on TCP sockets came with Linux 6.10; older kernels refuse the option."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(_SOL_SOCKET, SO_PEEK_OFF, 0)
    except OSError:
        return False
    finally:
        s.close()
    return True


PEEK_OFF: Final = probe_peek_off()


class TcpSockPort:
    """`SockPort` over a real non-blocking TCP socket."""

    __slots__ = ("acked_base", "arena", "fd", "peek_off", "sock")

    def __init__(self, sock: _socket.socket, arena: PeekArena, *, connected: bool) -> None:
        self.sock = sock
        self.arena = arena
        # tcpi_bytes_acked counts our SYN on a socket we connected, not on one we accepted.
        self.acked_base = 1 if connected else 0
        self.fd = sock.fileno()
        self.peek_off = -1  # unknown: set before the first peek
        if PEEK_OFF:
            sock.setsockopt(_SOL_SOCKET, SO_PEEK_OFF, 0)
            self.peek_off = 0

    def peek(self, offset: int, size: int) -> memoryview | None:
        """The view stays valid until the arena is reset (the end of the dataplane's batch)."""
        sock = self.sock
        if PEEK_OFF:
            if self.peek_off != offset:
                sock.setsockopt(_SOL_SOCKET, SO_PEEK_OFF, offset)
            region = self.arena.region(size if size < BUF_SIZE else BUF_SIZE)
            try:
                n = sock.recv_into(region, 0, _MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                self.peek_off = offset
                return None
            self.peek_off = offset + n
            self.arena.keep(region, n)
            return region[:n]
        return self._peek_from_start(offset, size)

    def _peek_from_start(self, offset: int, size: int) -> memoryview | None:
        """Without SO_PEEK_OFF (Linux before 6.10, Debian bookworm's 6.1 among them): peek everything up to
        offset+size into a scratch buffer and copy the part the guest does not have yet into the arena."""
        global _fallback
        want = offset + size
        if len(_fallback) < want:
            _fallback = memoryview(bytearray(want))
        try:
            n = self.sock.recv_into(_fallback, want, _MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        if n == 0:
            return _fallback[:0]
        if n <= offset:
            return None  # end of stream is only seen once everything was acknowledged
        region = self.arena.region(n - offset)
        region[:] = _fallback[offset:n]
        self.arena.keep(region, n - offset)
        return region

    def discard(self, n: int) -> None:
        while n > 0:
            got = self.sock.recv_into(_scratch, min(n, BUF_SIZE), _MSG_TRUNC)
            if got <= 0:
                break
            n -= got
            if self.peek_off >= 0:
                self.peek_off = max(0, self.peek_off - got)

    def send(self, chunks: list[memoryview], more: bool) -> int:
        try:
            if len(chunks) == 1:
                return self.sock.send(chunks[0], _MSG_MORE if more else 0)
            return self.sock.sendmsg(chunks[:IOV_MAX], (), _MSG_MORE if more else 0)
        except (BlockingIOError, InterruptedError):
            return 0

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def info(self) -> TcpInfo:
        raw = self.sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, TCP_INFO_LEN)
        sndbuf = self.sock.getsockopt(_SOL_SOCKET, _SO_SNDBUF)
        if len(raw) >= _TCPI_ALL.size:  # a kernel that reports tcpi_snd_wnd: one unpack
            rtt, retrans, acked, snd_wnd = _TCPI_ALL.unpack_from(raw)
            return TcpInfo(max(0, acked - self.acked_base), snd_wnd, sndbuf, rtt, retrans)
        acked = _TCPI_U64.unpack_from(raw, 120)[0] if len(raw) >= 128 else 0
        return TcpInfo(max(0, acked - self.acked_base), 65535, sndbuf, _TCPI_U32.unpack_from(raw, 68)[0],
                       _TCPI_U32.unpack_from(raw, 100)[0])  # fmt: skip

    def set_window_clamp(self, size: int) -> None:
        self.sock.setsockopt(_IPPROTO_TCP, _TCP_WINDOW_CLAMP, size)

    def set_mss(self, mss: int) -> None:
        self.sock.setsockopt(_IPPROTO_TCP, _TCP_MAXSEG, mss)

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        reset_socket(self.sock)

    def getsockname(self) -> object:
        return self.sock.getsockname()


class TcpIo:
    """Opens and watches host TCP sockets for the TCP core (its `SocketFactory`)."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.arena = PeekArena()
        self.outbound = Outbound()  # --outbound source addresses
        self.conns: dict[int, TcpConn] = {}
        self.on_connected: Callable[[TcpConn], None] = lambda conn: None
        self.on_error: Callable[[TcpConn, str], None] = lambda conn, reason: None
        self.on_readable: Callable[[TcpConn, bool], None] = lambda conn, eof: None
        self.on_writable: Callable[[TcpConn], None] = lambda conn: None
        self._writers: set[int] = set()
        self.connecting = False  # a connect() was started since the last poll

    def fileno(self) -> int:
        return self.epoll.fileno()

    def connect(self, conn: TcpConn) -> TcpSockPort:
        family = socket.AF_INET6 if conn.v6 else socket.AF_INET
        # The C socket type: socket.socket adds a Python-level __init__ and close() that cost more than the
        # syscalls behind them, once per connection each; nothing here needs its file-object support.
        sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        source = self.outbound.source(conn.target_addr)
        try:
            self.outbound.bind_device(sock, conn.target_addr)
            if source is not None:
                sock.bind((source, 0))
        except OSError:
            sock.close()
            raise
        if not conn.local:  # toward the network the guest's MSS is mirrored; on loopback it only costs
            try:
                sock.setsockopt(_IPPROTO_TCP, _TCP_MAXSEG, max(conn.mss_to_tap, 88))
            except OSError:
                pass
        err = sock.connect_ex(sockaddr(conn.target_addr, conn.remote_port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(err, errno_name(err))
        port = TcpSockPort(sock, self.arena, connected=True)
        self.conns[port.fd] = conn
        self.epoll.register(port.fd, EV_CONNECTING)
        self.connecting = True
        return port

    def adopt(self, sock: socket.socket) -> TcpSockPort:
        """An accepted socket, before the core knows its flow (see `bind`)."""
        sock.setblocking(False)
        return TcpSockPort(sock, self.arena, connected=False)

    def bind(self, conn: TcpConn) -> None:
        assert isinstance(conn.sock, TcpSockPort)
        self.conns[conn.sock.fd] = conn
        self.epoll.register(conn.sock.fd, EV_ESTABLISHED)

    def want_write(self, conn: TcpConn, on: bool) -> None:
        """Hear (edge-triggered) when the send buffer has room again: the guest's window waits on it."""
        sock = conn.sock
        if not isinstance(sock, TcpSockPort) or (sock.fd in self._writers) == on:
            return
        if on:
            self._writers.add(sock.fd)
            self.epoll.modify(sock.fd, EV_ESTABLISHED | _EPOLLOUT)
        else:
            self._writers.discard(sock.fd)
            self.epoll.modify(sock.fd, EV_ESTABLISHED)

    def forget(self, conn: TcpConn) -> None:
        """The core closes the socket right after this, and closing it takes it out of the epoll set (nothing
        else holds the descriptor), so only our maps change here: one epoll_ctl less per connection."""
        sock = conn.sock
        if isinstance(sock, TcpSockPort):
            self._writers.discard(sock.fd)
            self.conns.pop(sock.fd, None)

    def poll(self) -> int:
        """Dispatch every ready event; returns how many there were."""
        self.connecting = False
        events = self.epoll.poll(0, MAX_EVENTS)
        conns = self.conns
        for fd, ev in events:
            conn = conns.get(fd)
            if conn is None:
                continue
            sock = conn.sock
            if not isinstance(sock, TcpSockPort):
                continue
            if conn.events & st.EV_GUEST_SYN:
                if ev & (_EPOLLOUT | _EPOLLERR | _EPOLLHUP):
                    if ev & (_EPOLLERR | _EPOLLHUP):  # writable alone means connected
                        err = sock.sock.getsockopt(_SOL_SOCKET, _SO_ERROR)
                        self.on_error(conn, f"connect_failed:{errno_name(err, 'EHUP')}")
                        continue
                    self.epoll.modify(fd, EV_ESTABLISHED)
                    self.on_connected(conn)
                if ev & (_EPOLLIN | _EPOLLRDHUP) and conn.sock is not None:
                    # Data or EOF before the guest's ACK: the core notes it and peeks once established
                    # (it does not peek a socket that never signalled).
                    self.on_readable(conn, bool(ev & _EPOLLRDHUP))
                continue
            if ev & _EPOLLERR:
                err = sock.sock.getsockopt(_SOL_SOCKET, _SO_ERROR)
                if err:
                    name = errno_name(err)
                    self.on_error(conn, "rst_from_host" if err == errno.ECONNRESET else f"host_error:{name}")
                    continue
            if ev & _EPOLLOUT:
                self.on_writable(conn)
                if conn.sock is None:
                    continue
            if ev & (_EPOLLIN | _EPOLLRDHUP | _EPOLLHUP | _EPOLLERR):
                self.on_readable(conn, bool(ev & (_EPOLLRDHUP | _EPOLLHUP)))
        return len(events)

    def close(self) -> None:
        self.epoll.close()
