"""The vhost-user message protocol on the front end's UNIX stream socket (qemu docs/interop/vhost-user.rst).

Every message is a 12-byte header (request, flags, payload size; host byte order, little-endian here) and a
payload of at most `MAX_PAYLOAD` bytes; file descriptors travel beside it as SCM_RIGHTS ancillary data. The
front end sends each message with one sendmsg, and the kernel ends a read after the data that carried
descriptors, so `MessageReader` gives a read's descriptors to the last message starting in its buffer. A
stream may still deliver a message in pieces; the reader keeps the unfinished tail, so framing never depends
on how reads split.

A message that cannot be framed (oversized payload, truncated descriptors) is a `VhostUserError`: the stream
is out of step or hostile, and the only safe reaction is to drop the connection (the front end reconnects).
Every descriptor the reader took over is either handed to a `Message` (whose owner closes it) or closed here.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Final

from passtd.errors import PasstError


class VhostUserError(PasstError):
    """The front end broke the protocol; the connection is dropped."""


# Message header flags (vhost-user.rst "Header").
VERSION: Final = 0x1
FLAG_VERSION_MASK: Final = 0x3
FLAG_REPLY: Final = 0x4
FLAG_NEED_REPLY: Final = 0x8

# Front-end requests (vhost-user.rst "Front-end message types").
GET_FEATURES: Final = 1
SET_FEATURES: Final = 2
SET_OWNER: Final = 3
RESET_OWNER: Final = 4
SET_MEM_TABLE: Final = 5
SET_LOG_BASE: Final = 6
SET_LOG_FD: Final = 7
SET_VRING_NUM: Final = 8
SET_VRING_ADDR: Final = 9
SET_VRING_BASE: Final = 10
GET_VRING_BASE: Final = 11
SET_VRING_KICK: Final = 12
SET_VRING_CALL: Final = 13
SET_VRING_ERR: Final = 14
GET_PROTOCOL_FEATURES: Final = 15
SET_PROTOCOL_FEATURES: Final = 16
GET_QUEUE_NUM: Final = 17
SET_VRING_ENABLE: Final = 18
SEND_RARP: Final = 19
NET_SET_MTU: Final = 20
SET_BACKEND_REQ_FD: Final = 21
SET_VRING_ENDIAN: Final = 23
GET_CONFIG: Final = 24
SET_CONFIG: Final = 25
RESET_DEVICE: Final = 34

NAMES: Final = {
    value: name
    for name, value in dict(globals()).items()
    if name.isupper()
    and isinstance(value, int)
    and name.startswith(("GET_", "SET_", "RESET_", "SEND_", "NET_"))
}

# Protocol feature bits (vhost-user.rst "Protocol features").
PROTOCOL_F_MQ: Final = 0
PROTOCOL_F_REPLY_ACK: Final = 3
PROTOCOL_F_NET_MTU: Final = 4
PROTOCOL_F_CONFIG: Final = 9
PROTOCOL_F_RESET_DEVICE: Final = 13

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (front-end user addresses)
MEMORY_HEADER = struct.Struct("<II")  # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest physical address, size, front-end user address, mmap offset
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags

MAX_REGIONS: Final = 8  # VHOST_MEMORY_BASELINE_NREGIONS: the most a SET_MEM_TABLE can carry
MAX_FDS: Final = MAX_REGIONS
MAX_PAYLOAD: Final = 4096  # the largest defined payload (a full memory table) is 8 + 8 * 32 bytes
VRING_IDX_MASK: Final = 0xFF  # SET_VRING_KICK/CALL/ERR payload: queue index ...
VRING_NOFD_MASK: Final = 0x100  # ... and "no descriptor sent" (polling mode)


@dataclass(slots=True)
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return NAMES.get(self.request, f"request {self.request}")

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def take_fd(self) -> int:
        """The single descriptor this message must carry; the caller owns it from here."""
        if len(self.fds) != 1:
            raise VhostUserError(f"{self.name}: expected one descriptor, got {len(self.fds)}")
        return self.fds.pop()

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.pop())

    def u64(self) -> int:
        if len(self.payload) < U64.size:
            raise VhostUserError(f"{self.name}: payload of {len(self.payload)} bytes, expected 8")
        return int(U64.unpack_from(self.payload)[0])

    def vring_state(self) -> tuple[int, int]:
        if len(self.payload) < VRING_STATE.size:
            raise VhostUserError(f"{self.name}: payload of {len(self.payload)} bytes, expected 8")
        index, num = VRING_STATE.unpack_from(self.payload)
        return int(index), int(num)


class MessageReader:
    """Non-blocking framing of the front end's byte stream into `Message`s, with their descriptors."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._consumed = 0  # stream offset of _buf[0]
        self._fds: dict[int, list[int]] = {}  # stream offset of a message -> descriptors that came with it
        self._eof = False

    def read(self) -> list[Message]:
        """Whatever complete messages one recvmsg makes available. EOFError when the front end is gone."""
        if self._eof:
            raise EOFError("vhost-user front end closed the connection")
        try:
            data, ancdata, msg_flags, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            raise EOFError(str(exc)) from exc
        fds = array.array("i")
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        self._buf += data
        if fds:
            # The kernel ends a read after the data that carried descriptors, and the front end sends each
            # message with one sendmsg: the descriptors belong to the last message starting in the buffer.
            self._fds.setdefault(self._consumed + self._last_start(), []).extend(fds)
        if msg_flags & socket.MSG_CTRUNC:
            self.close()
            raise VhostUserError("more descriptors than any message carries")
        if not data:
            self._eof = True
            self.close()
            raise EOFError("vhost-user front end closed the connection")
        return self._messages()

    def _last_start(self) -> int:
        buf = self._buf
        pos = 0
        while pos + HEADER.size <= len(buf):
            end = pos + HEADER.size + HEADER.unpack_from(buf, pos)[2]
            if end >= len(buf):
                break
            pos = end
        return pos

    def _messages(self) -> list[Message]:
        out: list[Message] = []
        buf = self._buf
        start = 0
        while len(buf) - start >= HEADER.size:
            request, flags, size = HEADER.unpack_from(buf, start)
            if size > MAX_PAYLOAD:
                self.close()
                raise VhostUserError(f"payload of {size} bytes in request {request}")
            if len(buf) - start - HEADER.size < size:
                break
            payload = bytes(buf[start + HEADER.size : start + HEADER.size + size])
            out.append(Message(request, flags, payload, self._fds.pop(self._consumed + start, [])))
            start += HEADER.size + size
        del buf[:start]
        self._consumed += start
        return out

    def close(self) -> None:
        """Close descriptors that no message took over."""
        for fds in self._fds.values():
            for fd in fds:
                os.close(fd)
        self._fds.clear()


def encode_reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def encode_request(request: int, payload: bytes = b"", need_reply: bool = False) -> bytes:
    """A front end's message (used by the tests' front end and the bench's ring driver)."""
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload
