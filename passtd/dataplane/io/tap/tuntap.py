"""Tap back-end over a /dev/net/tun descriptor (pasta mode): one read or write is one Ethernet frame.

The descriptor comes from `passtd.dataplane.io.netns.create_tap` or `spawn_in_new_netns` (IFF_TAP |
IFF_NO_PI, non-blocking). Reads go into preallocated buffers, one per frame of a batch, so a batch costs no
allocation beyond the memoryview slices handed out.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Sequence
from typing import Final

from passtd.dataplane.io.tap.base import OutFrame
from passtd.dataplane.packets.vnet import VNET_HDR_LEN, ZERO_HDR

# The largest frame a tap hands over: 65535-byte MTU plus the Ethernet header, and room for a virtio-net
# header should one be used.
FRAME_BUF_SIZE: Final = 65536 + 64

# A write that fails with these lost only that frame (queue full, device down, bad frame); the guest's
# transport or our flow logic retransmits.
_DROP_ERRNOS: Final = frozenset(
    {errno.EAGAIN, errno.ENOBUFS, errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOMEM}
)
# The device is gone (tun detached: EBADFD) or the descriptor was closed under us.
_EOF_ERRNOS: Final = frozenset({errno.EBADF, errno.EBADFD})


class TunTapBackend:
    """`TapBackend` for a tap descriptor; owns the descriptor and closes it."""

    def __init__(self, fd: int, *, buf_size: int = FRAME_BUF_SIZE, vnet: bool = False) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        # Reads go through a FileIO on the same descriptor (not closing it): its readinto answers an empty
        # queue with None where os.readv raises BlockingIOError, and every batch ends on an empty queue.
        self._file = io.FileIO(fd, "rb", closefd=False)
        self._skip = VNET_HDR_LEN if vnet else 0  # every frame read starts with a virtio-net header
        self.vnet = vnet
        self._buf_size = buf_size
        self._bufs: list[bytearray] = []
        self._views: list[memoryview] = []
        self.dropped_tx = 0
        self.on_drained: Callable[[], None] = lambda: None  # never called: a tap write never queues

    @property
    def backlog(self) -> int:
        return 0  # a frame the tap does not take at once is dropped, never queued

    def fileno(self) -> int:
        return self._fd

    def _grow(self, count: int) -> None:
        while len(self._bufs) < count:
            buf = bytearray(self._buf_size)
            self._bufs.append(buf)
            self._views.append(memoryview(buf))

    def recv_batch(self, limit: int) -> list[memoryview]:
        """Up to `limit` frames ready now; each is a view into its own buffer, valid until the next call.

        EOFError only when no frame came before the end, so frames read just before it are not lost.
        """
        if self._fd < 0:
            raise EOFError("tap closed")
        if len(self._bufs) < limit:
            self._grow(limit)
        frames: list[memoryview] = []
        readinto = self._file.readinto
        for i in range(limit):
            try:
                n = readinto(self._bufs[i])
            except OSError as exc:
                if exc.errno not in _EOF_ERRNOS:
                    raise
                if frames:  # hand over what came before; the condition persists for the next call
                    break
                raise EOFError(f"tap device gone: {exc.strerror}") from None
            if n is None:
                break  # nothing more queued
            if n == 0:
                if frames:
                    break
                raise EOFError("tap device gone")
            if n <= self._skip:
                continue
            frames.append(self._views[i][self._skip : n])
        return frames

    def send_batch(self, frames: Sequence[OutFrame]) -> None:
        """Write each frame; one that the tap will not take now is dropped and counted, never queued."""
        fd = self._fd
        if fd < 0:
            self.dropped_tx += len(frames)
            return
        write = os.write
        writev = os.writev
        vnet = self.vnet
        for frame in frames:
            try:
                if isinstance(frame, tuple):
                    writev(fd, frame)
                elif vnet:
                    writev(fd, (ZERO_HDR, frame))
                else:
                    write(fd, frame)
            except OSError as exc:
                if exc.errno in _DROP_ERRNOS or exc.errno in _EOF_ERRNOS:
                    # a vanished device is reported by the next recv_batch (the fd polls readable with an
                    # error), so the dataplane sees one EOF path
                    self.dropped_tx += 1
                    continue
                raise

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._file.close()  # closefd=False: only marks it closed
            os.close(fd)
