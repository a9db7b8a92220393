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
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Final

from passtd.dataplane.io.tap.base import OutFrame
from passtd.errors import MalformedFrame

MAX_FRAME: Final = 65535 + 14  # an MTU 65535 payload plus the Ethernet header
MIN_FRAME: Final = 14
MAX_PENDING: Final = 4 * 1024 * 1024
_LEN = struct.Struct("!I")
_IOV_MAX: Final = 1024  # chunks per sendmsg (Linux UIO_MAXIOV)
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
        # What the socket has not taken yet: length prefixes and frames as they are (no joined copy), sent
        # with sendmsg's scatter list; a partly sent one is replaced by a view of its rest.
        self._queue: deque[bytes | memoryview] = deque()
        self._queued = 0
        self._writer = False
        self.on_drained: Callable[[], None] = lambda: None
        self._eof = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def backlog(self) -> int:
        """Bytes written by us that the socket has not taken yet."""
        return self._queued

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
        room = MAX_PENDING - self._queued
        chunks: list[bytes | memoryview] = []
        for frame in frames:
            assert not isinstance(frame, tuple)  # no virtio-net header on qemu's stream
            size = len(frame) + 4
            if size > room:
                self.dropped_tx += 1
                continue
            room -= size
            chunks.append(_LEN.pack(len(frame)))
            chunks.append(frame if type(frame) is bytes else bytes(frame))  # kept until sent: must not change
        if not chunks:
            return
        queue = self._queue
        queue.extend(chunks)
        self._queued += sum(map(len, chunks))
        if not self._writer:
            self._send_queued()
            if queue:
                self.loop.add_writer(self.sock.fileno(), self._flush)
                self._writer = True

    def _send_queued(self) -> None:
        """As much of the queue as the socket takes now, IOV_MAX chunks per sendmsg."""
        queue = self._queue
        while queue:
            batch = list(islice(queue, _IOV_MAX))
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                sent = self._queued  # the reader sees the disconnect and detaches us
            self._queued -= sent
            while sent and queue:
                head = queue[0]
                if len(head) <= sent:
                    sent -= len(head)
                    queue.popleft()
                else:
                    queue[0] = memoryview(head)[sent:]
                    sent = 0
            if self._queued < 0 or not queue:
                self._queued = 0
                queue.clear()
                return
            if len(batch) < _IOV_MAX:
                return  # the socket took less than offered: it is full

    def _flush(self) -> None:
        self._send_queued()
        if not self._queue:
            self.loop.remove_writer(self.sock.fileno())
            self._writer = False
            self.on_drained()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            if self._writer:
                self.loop.remove_writer(self.sock.fileno())
                self._writer = False
            self.sock.close()
