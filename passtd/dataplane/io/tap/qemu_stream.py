"""passt mode: qemu's `-netdev stream` (or `-netdev socket`) over a UNIX stream socket.

Each frame travels as a 4-byte big-endian length followed by the Ethernet frame. A stream read may end in
the middle of a length or a frame, or hold many frames: the decoder keeps the unfinished tail in a
preallocated buffer and hands out whole frames only. A length that cannot be an Ethernet frame means the
stream is out of step; there is no way to find the next frame boundary, so the guest is disconnected.

Writes must never tear a frame either, so what the socket does not take at once waits in a pending buffer
(bounded: past `MAX_PENDING` new frames are dropped and counted, and the guest's TCP retransmits).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Final

from passtd.dataplane.io.tap.base import OutFrame
from passtd.errors import BackendError, MalformedFrame

MAX_FRAME: Final = 65535 + 14  # an MTU 65535 payload plus the Ethernet header
MIN_FRAME: Final = 14
MAX_PENDING: Final = 4 * 1024 * 1024
_LEN = struct.Struct("!I")
_RECV_SIZE: Final = 1 << 20


class FrameDecoder:
    """Length-prefixed stream → whole frames; pure, so the framing is testable with arbitrary chunking."""

    def __init__(self, capacity: int = 2 * _RECV_SIZE + MAX_FRAME + 4) -> None:
        self.buf = bytearray(capacity)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def free_space(self) -> memoryview:
        """Room for the next read; compacts the unfinished tail to the front first."""
        if self.start:
            tail = self.end - self.start
            self.buf[0:tail] = self.view[self.start : self.end]
            self.start, self.end = 0, tail
        return self.view[self.end :]

    def feed(self, data: bytes | memoryview) -> None:
        """Copy `data` in (tests and callers without recv_into)."""
        space = self.free_space()
        if len(data) > len(space):
            raise MalformedFrame("stream.overflow")
        space[: len(data)] = data
        self.end += len(data)

    def frames(self, limit: int) -> list[memoryview]:
        """Up to `limit` whole frames; views are valid until the next `free_space`/`feed`."""
        out: list[memoryview] = []
        view, start, end = self.view, self.start, self.end
        while len(out) < limit and end - start >= 4:
            (length,) = _LEN.unpack_from(view, start)
            if length < MIN_FRAME or length > MAX_FRAME:
                raise MalformedFrame("stream.bad_length")
            if end - start - 4 < length:
                break
            out.append(view[start + 4 : start + 4 + length])
            start += 4 + length
        self.start = start
        return out


class QemuStreamBackend:
    """One connected guest (TapBackend)."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.decoder = FrameDecoder()
        self.dropped_tx = 0
        self._pending = bytearray()
        self._writer = False
        self.on_drained: Callable[[], None] = lambda: None
        self._eof = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def backlog(self) -> int:
        """Bytes written by us that the socket has not taken yet."""
        return len(self._pending)

    def recv_batch(self, limit: int) -> list[memoryview]:
        """One recv per call: the dataplane calls again on the next readiness event if more is there."""
        frames = self.decoder.frames(limit)
        if frames:
            return frames
        if self._eof:
            raise EOFError
        try:
            n = self.sock.recv_into(self.decoder.free_space()[:_RECV_SIZE])
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            raise EOFError(str(exc)) from exc
        if n == 0:
            self._eof = True
            raise EOFError
        self.decoder.end += n
        return self.decoder.frames(limit)

    def send_batch(self, frames: Sequence[OutFrame]) -> None:
        if not frames:
            return
        chunks: list[bytes | bytearray | memoryview] = []
        room = MAX_PENDING - len(self._pending)
        for frame in frames:
            assert not isinstance(frame, tuple)  # no virtio-net header on qemu's stream
            size = len(frame) + 4
            if size > room:
                self.dropped_tx += 1
                continue
            room -= size
            chunks.append(_LEN.pack(len(frame)))
            chunks.append(frame)
        if self._pending:
            self._pending += b"".join(chunks)
            return
        data = b"".join(chunks)
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return  # the reader sees the disconnect and detaches us
        if sent < len(data):
            self._pending += memoryview(data)[sent:]
            self._arm_writer()

    def _arm_writer(self) -> None:
        if not self._writer:
            self.loop.add_writer(self.sock.fileno(), self._flush)
            self._writer = True

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self._pending)
        del self._pending[:sent]
        if not self._pending:
            self.loop.remove_writer(self.sock.fileno())
            self._writer = False
            self.on_drained()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            if self._writer:
                self.loop.remove_writer(self.sock.fileno())
                self._writer = False
            self.sock.close()


class QemuStreamListener:
    """The UNIX socket qemu connects to; refuses to replace a live socket of another instance."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = bind_unix_listener(path)

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        return conn

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def bind_unix_listener(path: str, mode: int = 0o600) -> socket.socket:
    """Bind a listening UNIX socket, removing a stale file but never a socket someone still listens on."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        pass
    except ConnectionRefusedError:
        os.unlink(path)  # stale socket file of a dead process
    except OSError as exc:
        raise BackendError(f"cannot use socket path {path}: {exc.strerror}") from None
    else:
        raise BackendError(f"socket path {path} is in use by another process")
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise BackendError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(1)
    sock.setblocking(False)
    return sock
