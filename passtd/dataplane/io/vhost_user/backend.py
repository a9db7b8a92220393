"""passt mode over vhost-user: the `TapBackend` for a front end (qemu) connected to our vhost-user socket.

The dataplane watches one descriptor per back-end, and a vhost-user device has several: the front end's
socket (messages), each ring's kick eventfd, and our own "more to do" eventfd. They all sit in one epoll
set, whose descriptor is what `fileno()` returns (an epoll descriptor polls readable while any member is
ready). `recv_batch` then handles what is due, in this order: front-end messages (replies written at once),
kicks (cleared), queued receive frames when the guest has refilled its receive ring, and finally up to
`limit` frames from the transmit ring. If the transmit ring still holds frames, the wake eventfd is set, so
the dataplane comes back without waiting for a kick the guest will not send (it kicks once per batch).

Receive frames that find no free guest buffer wait in a bounded queue (`backlog`, as the stream back-end's
socket queue), in order, until the guest's next receive kick; `on_drained` then tells the dataplane to
resume the flows it held back. Past `MAX_PENDING` bytes, frames are dropped and counted in `dropped_tx`.

A protocol error drops the connection: `recv_batch` raises MalformedFrame("vhost_user.protocol"), which the
dataplane counts and answers by detaching us; a closed socket is EOFError, as for the stream back-end. Each
connection gets a new back-end: a restarted qemu starts from a fresh device.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

from passtd.dataplane.io.tap.base import OutFrame
from passtd.dataplane.io.vhost_user.device import VhostUserDevice
from passtd.dataplane.io.vhost_user.net import PUT_DROPPED, PUT_FULL, segment_tcp
from passtd.dataplane.io.vhost_user.protocol import MessageReader, VhostUserError
from passtd.errors import BackendError, MalformedFrame

MAX_PENDING: Final = 4 * 1024 * 1024
MAX_MESSAGES: Final = 64  # front-end messages handled per call; the rest wait for the next wake-up
_ONE: Final = (1).to_bytes(8, "little")

Pending = tuple[bytes | None, tuple[bytes | bytearray | memoryview, ...]]


def _split(frame: OutFrame) -> Pending:
    """(virtio-net header or None, frame parts) of one dataplane frame."""
    if isinstance(frame, tuple):
        hdr = frame[0]
        return (hdr if type(hdr) is bytes else bytes(hdr)), frame[1:]
    return None, (frame,)


class VhostUserBackend:
    """One connected front end (TapBackend)."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, mtu: int = 65520) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.device = VhostUserDevice(mtu=mtu)
        self.net = self.device.net
        self.reader = MessageReader(sock)
        self.dropped_tx = 0
        self.on_drained: Callable[[], None] = lambda: None
        self.error = ""  # why the connection was dropped, for the log
        self._pending: deque[Pending] = deque()
        self._pending_bytes = 0
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._woken = False  # the wake eventfd is set: only then is it read (an empty read raises)
        self._ep = select.epoll()
        self._ep.register(sock.fileno(), select.EPOLLIN)
        self._ep.register(self._wake, select.EPOLLIN)
        self._watched: set[int] = set()  # kick descriptors in the epoll set
        for vq in self.device.queues:
            vq.on_kick_close = self._unwatch

    @classmethod
    def from_fd(cls, fd: int, loop: asyncio.AbstractEventLoop, mtu: int = 65520) -> VhostUserBackend:
        """A back-end on an already connected socket (`--fd`); takes the descriptor over."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise BackendError(f"--fd {fd}: {exc.strerror}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise BackendError(f"--fd {fd}: not a UNIX stream socket")
        return cls(sock, loop, mtu)

    @property
    def drops(self) -> dict[str, int]:
        """Hostile or unusable ring contents, counted by reason."""
        return self.device.drops

    @property
    def backlog(self) -> int:
        return self._pending_bytes

    def fileno(self) -> int:
        return self._ep.fileno()

    # -- events ---------------------------------------------------------------------------------------------

    def recv_batch(self, limit: int) -> list[memoryview]:
        tx = self.net.tx
        if tx.quiet:
            tx.set_notify(True)  # before the poll below: its syscall orders this store before the avail read
        if self._woken:
            self._woken = False
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
        for fd, _ in self._ep.poll(0):
            if fd == self.sock.fileno():
                self._control()
            elif fd in self._watched:
                try:
                    os.eventfd_read(fd)  # a kick: the rings are looked at below whatever woke us
                except BlockingIOError:
                    pass
        if self._pending and self.net.rx.ready:
            self._flush_pending()
        frames = self.net.tx_frames(limit)
        if tx.available():
            tx.set_notify(False)  # the wake brings us back: the guest need not kick meanwhile
            os.eventfd_write(self._wake, 1)
            self._woken = True
        return frames

    def _control(self) -> None:
        for _ in range(MAX_MESSAGES):
            try:
                messages = self.reader.read()
            except VhostUserError as exc:
                self.error = str(exc)
                raise MalformedFrame("vhost_user.protocol") from None
            if not messages:
                break
            for i, msg in enumerate(messages):
                try:
                    reply = self.device.handle(msg)
                except VhostUserError as exc:
                    for rest in messages[i + 1 :]:
                        rest.close_fds()
                    self.error = str(exc)
                    raise MalformedFrame("vhost_user.protocol") from None
                if reply:
                    self._reply(reply)
        self._sync_kicks()

    def _reply(self, data: bytes) -> None:
        """Replies are a few bytes on a socket the front end reads right after asking: a full socket means a
        front end that does not follow the protocol."""
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise EOFError(str(exc)) from exc
        if sent != len(data):
            self.error = "front end does not read its replies"
            raise MalformedFrame("vhost_user.protocol")

    def _sync_kicks(self) -> None:
        """Watch the rings' current kick descriptors (closing one unwatches it first: `_unwatch`)."""
        for vq in self.device.queues:
            fd = vq.kick_fd
            if fd >= 0 and fd not in self._watched:
                self._ep.register(fd, select.EPOLLIN)
                self._watched.add(fd)

    def _unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.discard(fd)
            self._ep.unregister(fd)

    # -- frames to the guest --------------------------------------------------------------------------------

    def send_batch(self, frames: Sequence[OutFrame]) -> None:
        net = self.net
        if not net.rx.ready:
            self.dropped_tx += len(frames)  # no driver: nothing is waiting for these
            return
        items = [_split(frame) for frame in frames]
        if not (net.guest_tso4 and net.guest_tso6):
            items = self._segmented(items)
        i = 0
        if not self._pending:
            put = net.put
            for i, (hdr, parts) in enumerate(items):  # noqa: B007 - i is where queueing starts
                result = put(hdr, parts)
                if result == PUT_FULL:
                    break
                if result == PUT_DROPPED:
                    self.dropped_tx += 1
            else:
                i = len(items)
            net.rx.publish()
        for hdr, parts in items[i:]:
            size = 0
            for part in parts:
                size += len(part)
            if self._pending_bytes + size > MAX_PENDING:
                self.dropped_tx += 1
                continue
            # kept until the guest has room: must not change under us
            self._pending.append((hdr, tuple(p if type(p) is bytes else bytes(p) for p in parts)))
            self._pending_bytes += size

    def _segmented(self, items: list[Pending]) -> list[Pending]:
        """Super-segments cut here for a guest without TSO; every piece is a frame of its own."""
        out: list[Pending] = []
        for hdr, parts in items:
            if hdr is not None and self.net.must_segment(hdr):
                out.extend((None, (seg,)) for seg in segment_tcp(hdr, parts))
            else:
                out.append((hdr, parts))
        return out

    def _flush_pending(self) -> None:
        net = self.net
        pending = self._pending
        while pending:
            hdr, parts = pending[0]
            result = net.put(hdr, parts)
            if result == PUT_FULL:
                break
            pending.popleft()
            for part in parts:
                self._pending_bytes -= len(part)
            if result == PUT_DROPPED:
                self.dropped_tx += 1
        net.rx.publish()
        if not pending:
            self._pending_bytes = 0
            self.loop.call_soon(self.on_drained)

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        self._watched.clear()
        self._ep.close()
        os.close(self._wake)
        self.reader.close()
        self.device.close()
        self.sock.close()
        self._pending.clear()
        self._pending_bytes = 0
