"""A small vhost-user front end for tests: it plays qemu (messages, memfd, eventfds) and the guest's
virtio-net driver (descriptor tables, avail/used rings in the shared memory), so the back-end is exercised
through its real socket and real shared memory, without a VM.

Guest memory is one memfd shared as two regions with a hole between them (as qemu does around the PC's
legacy hole), so translation across regions is exercised too:
    region 0: gpa [0, 1 MiB)         = memfd [0, 1 MiB)
    region 1: gpa [2 MiB, 2 + 7 MiB) = memfd [1 MiB, 8 MiB)
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from passtd.dataplane.io.vhost_user import protocol as p
from passtd.dataplane.io.vhost_user.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

MiB: Final = 1 << 20
MEM_SIZE: Final = 8 * MiB
REGIONS: Final = ((0, 1 * MiB, 0x7F0000000000, 0), (2 * MiB, 7 * MiB, 0x7F0010000000, 1 * MiB))
RING_BASE: Final = 2 * MiB  # ring areas of both queues live here (gpa)
HEAP_BASE: Final = 2 * MiB + 512 * 1024  # buffers from here (the rings take 4 * 64 KiB each)
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED = struct.Struct("<II")
HDR = struct.Struct("<BBHHHHH")


def gpa_to_off(gpa: int) -> int:
    for base, size, _, off in REGIONS:
        if base <= gpa < base + size:
            return off + gpa - base
    raise ValueError(f"gpa {gpa:#x} is in no region")


def gpa_to_uva(gpa: int) -> int:
    for base, size, uva, _ in REGIONS:
        if base <= gpa < base + size:
            return uva + gpa - base
    raise ValueError(f"gpa {gpa:#x} is in no region")


@dataclass
class DriverRing:
    """The driver's side of one split virtqueue."""

    mem: mmap.mmap
    size: int
    desc: int  # gpa
    avail: int
    used: int
    avail_idx: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)
    chains: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free = list(range(self.size))[::-1]

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa_to_off(gpa)
        self.mem[off : off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = gpa_to_off(gpa)
        return bytes(self.mem[off : off + length])

    def set_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.write(self.desc + 16 * index, DESC.pack(addr, length, flags, nxt))

    def add(self, bufs: Sequence[tuple[int, int]], writable: bool) -> int:
        """Chain `bufs` (gpa, length) into free descriptors and make the chain available; returns its head."""
        ids = [self.free.pop() for _ in bufs]
        for i, (addr, length) in enumerate(bufs):
            last = i == len(bufs) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.set_desc(ids[i], addr, length, flags, 0 if last else ids[i + 1])
        self.chains[ids[0]] = ids
        self.offer(ids[0])
        return ids[0]

    def add_indirect(self, table_gpa: int, bufs: Sequence[tuple[int, int]], writable: bool) -> int:
        """One descriptor pointing at an indirect table (built at `table_gpa`) of `bufs`."""
        for i, (addr, length) in enumerate(bufs):
            last = i == len(bufs) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.write(table_gpa + 16 * i, DESC.pack(addr, length, flags, 0 if last else i + 1))
        head = self.free.pop()
        self.set_desc(head, table_gpa, 16 * len(bufs), DESC_F_INDIRECT, 0)
        self.chains[head] = [head]
        self.offer(head)
        return head

    def offer(self, head: int) -> None:
        self.write(self.avail + 4 + 2 * (self.avail_idx % self.size), U16.pack(head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.write(self.avail + 2, U16.pack(self.avail_idx))

    def take_used(self) -> list[tuple[int, int]]:
        """(head, length) of each chain the device returned since the last call; frees their descriptors."""
        out = []
        idx = U16.unpack(self.read(self.used + 2, 2))[0]
        while self.last_used != idx:
            head, length = USED.unpack(self.read(self.used + 4 + 8 * (self.last_used % self.size), 8))
            out.append((head, length))
            self.free.extend(self.chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def set_avail_flags(self, flags: int) -> None:
        self.write(self.avail, U16.pack(flags))


class FrontEnd:
    """qemu's half of the protocol on `sock`; `pump` lets the back-end run (handle what we sent)."""

    def __init__(self, sock: socket.socket, pump: Callable[[], object], qsize: int = 256) -> None:
        self.sock = sock
        self.pump = pump
        self.qsize = qsize
        self.memfd = os.memfd_create("vhost-test-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = mmap.mmap(self.memfd, MEM_SIZE)
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        step = 0x10000
        self.rings = [
            DriverRing(
                self.mem,
                qsize,
                RING_BASE + q * 4 * step,
                RING_BASE + q * 4 * step + step,
                RING_BASE + q * 4 * step + 2 * step,
            )
            for q in range(2)
        ]
        self.heap = HEAP_BASE
        self.hdr_len = 12
        self.rx_bufs: dict[int, tuple[int, int]] = {}  # head -> (gpa, size) of posted receive buffers

    def close(self) -> None:
        for fd in (*self.kick, *self.call, self.memfd):
            os.close(fd)
        self.mem.close()

    # -- messages -------------------------------------------------------------------------------------------

    def send(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), need_reply: bool = False
    ) -> None:
        data = p.encode_request(request, payload, need_reply)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)
        self.pump()

    def reply(self, request: int) -> bytes:
        head = self.sock.recv(p.HEADER.size)
        assert len(head) == p.HEADER.size, head
        req, flags, size = p.HEADER.unpack(head)
        assert req == request and flags & p.FLAG_REPLY, (req, flags)
        return self.sock.recv(size) if size else b""

    def call_u64(self, request: int, payload: bytes = b"") -> int:
        self.send(request, payload)
        return int(p.U64.unpack(self.reply(request))[0])

    def acked(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY and return the ack's status (REPLY_ACK must have been negotiated)."""
        self.send(request, payload, fds, need_reply=True)
        return int(p.U64.unpack(self.reply(request))[0])

    def mem_table_payload(self) -> bytes:
        payload = p.MEMORY_HEADER.pack(len(REGIONS), 0)
        for gpa, size, uva, off in REGIONS:
            payload += p.MEMORY_REGION.pack(gpa, size, uva, off)
        return payload

    def setup(self, features: int | None = None, protocol: int | None = None, enable: bool = True) -> int:
        """The start-up sequence qemu sends for a vhost-user NIC; returns the negotiated features."""
        self.send(p.SET_OWNER)
        offered = self.call_u64(p.GET_FEATURES)
        features = offered if features is None else features
        self.send(p.SET_FEATURES, p.U64.pack(features))
        if features >> 30 & 1:
            offered_p = self.call_u64(p.GET_PROTOCOL_FEATURES)
            proto = offered_p if protocol is None else protocol
            self.send(p.SET_PROTOCOL_FEATURES, p.U64.pack(proto))
        self.hdr_len = 12 if features >> 15 & 1 or features >> 32 & 1 else 10
        self.send(p.SET_MEM_TABLE, self.mem_table_payload(), [self.memfd] * len(REGIONS))
        for q, ring in enumerate(self.rings):
            self.send(p.SET_VRING_NUM, p.VRING_STATE.pack(q, self.qsize))
            self.send(p.SET_VRING_BASE, p.VRING_STATE.pack(q, 0))
            self.send(
                p.SET_VRING_ADDR,
                p.VRING_ADDR.pack(
                    q, 0, gpa_to_uva(ring.desc), gpa_to_uva(ring.used), gpa_to_uva(ring.avail), 0
                ),
            )
            self.send(p.SET_VRING_CALL, p.U64.pack(q), [self.call[q]])
            self.send(
                p.SET_VRING_ERR, p.U64.pack(q), [self.call[q]]
            )  # qemu sends one; the back-end closes it
            self.send(p.SET_VRING_KICK, p.U64.pack(q), [self.kick[q]])
            if enable and features >> 30 & 1:
                self.send(p.SET_VRING_ENABLE, p.VRING_STATE.pack(q, 1))
        return features

    # -- the guest driver's side ----------------------------------------------------------------------------

    def alloc(self, size: int) -> int:
        gpa = self.heap
        self.heap += (size + 63) & ~63
        assert self.heap < REGIONS[1][0] + REGIONS[1][1], "test heap exhausted"
        return gpa

    def kick_queue(self, q: int) -> None:
        os.eventfd_write(self.kick[q], 1)

    def calls(self, q: int) -> int:
        try:
            return os.eventfd_read(self.call[q])
        except BlockingIOError:
            return 0

    def post_rx(self, count: int, size: int) -> list[int]:
        ring = self.rings[0]
        heads = []
        for _ in range(count):
            gpa = self.alloc(size)
            heads.append(ring.add([(gpa, size)], writable=True))
            self.rx_bufs[heads[-1]] = (gpa, size)
        self.kick_queue(0)
        return heads

    def read_rx(self) -> list[tuple[bytes, bytes]]:
        """(virtio-net header, frame) of every frame the device wrote, joining mergeable buffers."""
        ring = self.rings[0]
        out = []
        used = ring.take_used()
        i = 0
        while i < len(used):
            head, length = used[i]
            gpa, _ = self.rx_bufs[head]
            data = ring.read(gpa, length)
            hdr, frame = data[: self.hdr_len], data[self.hdr_len :]
            count = HDR.unpack_from(hdr + bytes(2))[6] if self.hdr_len == 12 else 1
            for j in range(1, count):
                head2, length2 = used[i + j]
                gpa2, _ = self.rx_bufs[head2]
                frame += ring.read(gpa2, length2)
            out.append((hdr, frame))
            i += max(count, 1)
        return out

    def tx(self, frame: bytes, hdr: bytes | None = None, pieces: int = 1) -> int:
        """Transmit `frame` (with a zero or given virtio-net header), cut into `pieces` descriptors."""
        data = (hdr if hdr is not None else bytes(self.hdr_len)) + frame
        cut = max(1, -(-len(data) // pieces))
        bufs = []
        for start in range(0, len(data), cut):
            gpa = self.alloc(cut)
            self.rings[1].write(gpa, data[start : start + cut])
            bufs.append((gpa, len(data[start : start + cut])))
        return self.rings[1].add(bufs, writable=False)
