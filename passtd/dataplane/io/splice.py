"""Socket-to-socket relay for loopback-to-loopback paths (pasta's splice bypass, and -T).

When both ends are local sockets there is no guest TCP to mirror: the two kernels' sockets are joined by
copying bytes between them, with a bounded buffer per direction, half-close relayed with shutdown(SHUT_WR)
and a reset relayed as a reset (SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Final

BUF: Final = 1 << 20
_LINGER0: Final = struct.pack("ii", 1, 0)


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
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                except OSError:
                    pass
            sock.close()
        self.on_done(self, reason)

    def reset(self) -> None:
        self._finish("reset_by_api", reset=True)
