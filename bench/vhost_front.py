"""A vhost-user front end for the benchmark: plays qemu and the guest's virtio-net driver, with a tap device
in the guest namespace as the "guest", so that namespace's own kernel stack runs iperf3 and bench/peer.py.

    vhost_front.py SOCKET IFNAME [--time S] [--queue N] [--buf BYTES]   (run in the guest ns; prints `ready`)

It connects to the back-end's `--vhost-user` socket, negotiates the virtio-net features a Linux guest takes
(VERSION_1, mergeable receive buffers, checksum and TSO offloads both ways, as far as the back-end offers
them), shares one memfd as the guest's memory, and drives one queue pair:

- guest → back-end: the tap is read (`os.readv`) straight into a transmit buffer in the shared memory, header
  included (IFF_VNET_HDR with the virtio-net header's size), and the buffer is made available; one kick per
  batch. The tap's TUNSETOFFLOAD mirrors what the back-end accepts, so 64 KiB TSO frames cross as they are.
- back-end → guest: every receive buffer is posted once, at start; what the back-end returns used is written
  to the tap (`os.writev` of the chain's buffers, header first: the tap takes the offloads as a NIC's), and
  the buffers are made available again; one kick per batch.

Nothing is copied by this process: the kernel copies between the tap and the shared memory, the back-end
between the shared memory and its sockets. Transmit completions are not interrupts (their buffers are taken
back on each pass) unless the transmit ring is full. The code follows the specifications (virtio 1.2 §2.7,
§5.1; qemu's docs/interop/vhost-user.rst), not passtd's modules, so it checks the back-end independently.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Final

# -- vhost-user messages (vhost-user.rst) ------------------------------------------------------------------
GET_FEATURES, SET_FEATURES, SET_OWNER = 1, 2, 3
SET_MEM_TABLE, SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE = 5, 8, 9, 10
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, SET_VRING_ENABLE = 15, 16, 18
FLAG_VERSION, FLAG_REPLY, FLAG_NEED_REPLY = 1, 4, 8
PROTOCOL_F_REPLY_ACK: Final = 3
HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (front-end user addresses)
MEM_HEADER = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")  # guest address, size, user address, mmap offset

# -- virtio-net features (virtio 1.2 §5.1.3) --------------------------------------------------------------
F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6 = 0, 1, 7, 8
F_HOST_TSO4, F_HOST_TSO6, F_MRG_RXBUF = 11, 12, 15
F_PROTOCOL_FEATURES, F_VERSION_1 = 30, 32
WANTED: Final = sum(1 << b for b in (F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4,
                                     F_HOST_TSO6, F_MRG_RXBUF, F_PROTOCOL_FEATURES, F_VERSION_1))  # fmt: skip

# -- split rings (virtio 1.2 §2.7) --------------------------------------------------------------------------
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
USED = struct.Struct("<II")
DESC_F_WRITE = 2
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
RX, TX = 0, 1

# -- tap (linux/if_tun.h) ------------------------------------------------------------------------------------
TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ = 0x400454CA, 0x400454D0, 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 1, 2, 4

PAGE: Final = 4096
UVA_BASE: Final = 0x7F5500000000  # the "qemu" address of the memory; only a number the back-end translates
BATCH: Final = 64  # tap frames read per pass
MAX_FRAME: Final = 65535 + 14  # the largest frame a TSO tap hands over: an IP packet and its Ethernet header


def _align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) & ~(to - 1)


class Ring:
    """The driver's side of one split virtqueue in the shared memory; descriptor i always points at
    buffer i (only its length changes), so a chain is one descriptor and its id names its buffer."""

    def __init__(self, mem: mmap.mmap, base: int, size: int) -> None:
        self.mem = mem
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = _align(self.avail + 6 + 2 * size)
        self.end = _align(self.used + 6 + 8 * size)
        # The avail ring's flags and index as 16-bit cells: the back-end reads them while we write, and an
        # item assignment is one 2-byte store, where struct.pack_into clears the field before writing it.
        self.avail16 = memoryview(mem)[self.avail : self.avail + 4].cast("H")
        self.used16 = memoryview(mem)[self.used : self.used + 4].cast("H")  # flags, index
        self.avail_idx = 0  # free-running, as the ring's own 16-bit index
        self.last_used = 0

    def offer(self, ids: list[int] | tuple[int, ...]) -> None:
        """Make chains available and publish the new index (entries first: x86 keeps stores in order; the
        entries may be written any way, the back-end reads them only once the index covers them)."""
        mem, avail, mask = self.mem, self.avail + 4, self.size - 1
        idx = self.avail_idx
        for i in ids:
            U16.pack_into(mem, avail + 2 * (idx & mask), i)
            idx += 1
        self.avail_idx = idx & 0xFFFF
        self.avail16[1] = self.avail_idx

    def used_pending(self) -> int:
        idx: int = U16.unpack_from(self.mem, self.used + 2)[0]
        return (idx - self.last_used) & 0xFFFF

    def take_used(self, n: int) -> list[tuple[int, int]]:
        mem, used, mask = self.mem, self.used + 4, self.size - 1
        out = []
        last = self.last_used
        for _ in range(n):
            out.append(USED.unpack_from(mem, used + 8 * (last & mask)))
            last += 1
        self.last_used = last & 0xFFFF
        return out

    def set_interrupts(self, on: bool) -> None:
        self.avail16[0] = 0 if on else AVAIL_F_NO_INTERRUPT


class Front:
    def __init__(self, path: str, ifname: str, qsize: int, buf: int) -> None:
        self.qsize, self.buf = qsize, buf
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        stride = _align(16 * qsize + 6 + 2 * qsize) + _align(6 + 8 * qsize)
        self.bufs_at = 2 * stride
        self.tx_buf = _align(12 + MAX_FRAME)  # a transmit chain is one buffer: it takes any tap frame
        self.size = self.bufs_at + qsize * (_align(buf) + self.tx_buf)
        self.memfd = os.memfd_create("vhost-front-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, self.size)
        self.mem = mmap.mmap(self.memfd, self.size)
        self.view = memoryview(self.mem)
        self.rings = [Ring(self.mem, 0, qsize), Ring(self.mem, stride, qsize)]
        # buffer i of queue q: see addr()
        self.bufviews = [
            [self.view[self.addr(q, i) : self.addr(q, i) + self.buf_len(q)] for i in range(qsize)]
            for q in (RX, TX)
        ]
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in (RX, TX)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in (RX, TX)]
        self.tap = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(self.tap, TUNSETIFF, struct.pack("16sH", ifname.encode(), flags))
        self.reply_ack = False
        self.hdr_len = 12
        self.mergeable = False
        self.tx_free: list[int] = list(range(qsize - 1, -1, -1))
        self.stats = {"tx_frames": 0, "tx_bytes": 0, "tx_max": 0, "rx_frames": 0, "rx_bytes": 0, "rx_max": 0,
                      "passes": 0, "tx_full": 0, "kicks_saved": 0}  # fmt: skip

    def addr(self, q: int, i: int) -> int:
        """Guest address of buffer i of queue q: the receive buffers, then the transmit ones."""
        if q == RX:
            return self.bufs_at + i * _align(self.buf)
        return self.bufs_at + self.qsize * _align(self.buf) + i * self.tx_buf

    def buf_len(self, q: int) -> int:
        return self.buf if q == RX else self.tx_buf

    # -- messages -------------------------------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (), ack: bool = True) -> None:
        """One message; with REPLY_ACK negotiated, wait for the back-end's ack and check it is 0."""
        need = ack and self.reply_ack
        flags = FLAG_VERSION | (FLAG_NEED_REPLY if need else 0)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([HEADER.pack(request, flags, len(payload)) + payload], anc)
        if need and self.get_u64(request) != 0:
            raise RuntimeError(f"back-end refused request {request}")

    def get_u64(self, request: int) -> int:
        head = self._recv_exact(HEADER.size)
        req, flags, size = HEADER.unpack(head)
        if req != request or not flags & FLAG_REPLY or size != 8:
            raise RuntimeError(f"bad reply to request {request}: {req} {flags:#x} {size}")
        value: int = U64.unpack(self._recv_exact(8))[0]
        return value

    def ask(self, request: int) -> int:
        self.send(request, ack=False)
        return self.get_u64(request)

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError("back-end closed the socket")
            data += chunk
        return data

    def setup(self) -> int:
        """qemu's start-up sequence for a vhost-user NIC; returns the negotiated features."""
        self.sock.settimeout(10)
        self.send(SET_OWNER, ack=False)
        features = self.ask(GET_FEATURES) & WANTED
        self.send(SET_FEATURES, U64.pack(features), ack=False)
        if features >> F_PROTOCOL_FEATURES & 1:
            proto = self.ask(GET_PROTOCOL_FEATURES) & (1 << PROTOCOL_F_REPLY_ACK)
            self.send(SET_PROTOCOL_FEATURES, U64.pack(proto), ack=False)
            self.reply_ack = bool(proto)
        self.mergeable = bool(features >> F_MRG_RXBUF & 1)
        self.hdr_len = 12 if self.mergeable or features >> F_VERSION_1 & 1 else 10
        fcntl.ioctl(self.tap, TUNSETVNETHDRSZ, struct.pack("i", self.hdr_len))
        # What the kernel may hand us (guest → back-end) is what the back-end accepts.
        offload = 0
        if features >> F_CSUM & 1:
            offload |= TUN_F_CSUM
            offload |= TUN_F_TSO4 if features >> F_HOST_TSO4 & 1 else 0
            offload |= TUN_F_TSO6 if features >> F_HOST_TSO6 & 1 else 0
        fcntl.ioctl(self.tap, TUNSETOFFLOAD, offload)
        table = MEM_HEADER.pack(1, 0) + MEM_REGION.pack(0, self.size, UVA_BASE, 0)
        self.send(SET_MEM_TABLE, table, (self.memfd,))
        for q, ring in enumerate(self.rings):
            self.send(SET_VRING_NUM, VRING_STATE.pack(q, self.qsize))
            self.send(SET_VRING_BASE, VRING_STATE.pack(q, 0))
            self.send(SET_VRING_ADDR, VRING_ADDR.pack(q, 0, UVA_BASE + ring.desc, UVA_BASE + ring.used,
                                                      UVA_BASE + ring.avail, 0))  # fmt: skip
            self.send(SET_VRING_CALL, U64.pack(q), (self.call[q],))
            self.send(SET_VRING_KICK, U64.pack(q), (self.kick[q],))
            if features >> F_PROTOCOL_FEATURES & 1:
                self.send(SET_VRING_ENABLE, VRING_STATE.pack(q, 1))
        # Descriptors: i -> buffer i; receive ones writable and all posted, transmit ones filled per frame.
        for q, ring in enumerate(self.rings):
            for i in range(self.qsize):
                DESC.pack_into(self.mem, ring.desc + 16 * i, self.addr(q, i), self.buf_len(q),
                               DESC_F_WRITE if q == RX else 0, 0)  # fmt: skip
        self.rings[TX].set_interrupts(False)
        self.rings[RX].offer(list(range(self.qsize)))
        os.eventfd_write(self.kick[RX], 1)
        self.sock.setblocking(False)
        return features

    # -- the data path --------------------------------------------------------------------------------------

    def to_tap(self) -> int:
        """Write what the back-end returned in the receive ring to the tap; post the buffers again."""
        ring = self.rings[RX]
        n = ring.used_pending()
        if not n:
            return 0
        used = ring.take_used(n)
        views = self.bufviews[RX]
        tap, hdr_len, mergeable = self.tap, self.hdr_len, self.mergeable
        frames = 0
        nbytes = 0
        largest = self.stats["rx_max"]
        i = 0
        while i < n:
            head, length = used[i]
            count = U16.unpack_from(views[head], 10)[0] if mergeable else 1
            if count <= 1:
                iov = [views[head][:length]]
                i += 1
            else:  # a frame across several buffers: the header is in the first
                iov = [views[h][:ln] for h, ln in used[i : i + count]]
                i += count
            try:
                size = os.writev(tap, iov) - hdr_len
                nbytes += size
                frames += 1
                if size > largest:
                    largest = size
            except BlockingIOError:
                pass  # the guest's backlog is full: dropped, as a NIC would
            except OSError:
                self.stats["rx_errors"] = self.stats.get("rx_errors", 0) + 1
        ring.offer([h for h, _ in used])
        os.eventfd_write(self.kick[RX], 1)
        self.stats["rx_frames"] += frames
        self.stats["rx_bytes"] += nbytes
        self.stats["rx_max"] = largest
        return n

    def from_tap(self) -> int:
        """Read up to BATCH frames from the tap into free transmit buffers and make each available at once;
        kick unless the back-end set USED_F_NO_NOTIFY (virtio §2.7.10). The flag is read only after a read
        that found the tap empty: that syscall is the full barrier a driver needs between publishing its
        index and reading the flag (the back-end clears the flag, then reads the index after a syscall)."""
        ring = self.rings[TX]
        pending = ring.used_pending()
        if pending:
            self.tx_free.extend(h for h, _ in ring.take_used(pending))
        free = self.tx_free
        views = self.bufviews[TX]
        tap, mem, desc, hdr_len = self.tap, self.mem, ring.desc, self.hdr_len
        count = 0
        nbytes = 0
        largest = self.stats["tx_max"]
        drained = False
        while count < BATCH and free:
            i = free[-1]
            try:
                n = os.readv(tap, [views[i]])
            except BlockingIOError:
                drained = True
                break
            free.pop()
            U32.pack_into(mem, desc + 16 * i + 8, n)
            ring.offer((i,))
            count += 1
            n -= hdr_len
            nbytes += n
            if n > largest:
                largest = n
        if count:
            if not (drained and ring.used16[0] & USED_F_NO_NOTIFY):
                os.eventfd_write(self.kick[TX], 1)
            else:
                self.stats["kicks_saved"] += 1
            self.stats["tx_frames"] += count
            self.stats["tx_bytes"] += nbytes
            self.stats["tx_max"] = largest
        return count

    def state(self) -> str:
        """Counters and ring indices, one line (SIGUSR1 prints it: where a stalled transfer waits)."""
        rings = " ".join(
            f"{name}: avail={r.avail_idx} used={U16.unpack_from(self.mem, r.used + 2)[0]} taken={r.last_used}"
            for name, r in (("rx", self.rings[RX]), ("tx", self.rings[TX]))
        )
        counts = " ".join(f"{k}={v}" for k, v in self.stats.items())
        return f"{counts} tx_free={len(self.tx_free)} {rings}"

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        ep = select.epoll()
        ep.register(self.tap, select.EPOLLIN)
        ep.register(self.call[RX], select.EPOLLIN)
        ep.register(self.call[TX], select.EPOLLIN)
        ep.register(self.sock.fileno(), select.EPOLLIN)
        tap_watched = True
        tx_ring = self.rings[TX]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            tap_ready = False
            for fd, _ in ep.poll(min(left, 1.0)):
                if fd == self.tap:
                    tap_ready = True
                elif fd == self.sock.fileno():
                    if not self.sock.recv(4096):
                        return  # the back-end went away
                else:
                    tap_ready |= fd == self.call[TX]  # transmit buffers came back while the tap was unwatched
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
            self.stats["passes"] += 1
            self.to_tap()
            if tap_ready:  # what a batch leaves in the tap keeps it readable: the next poll returns at once
                self.from_tap()
            # Out of transmit buffers: stop watching the tap and ask for a completion interrupt instead.
            if not self.tx_free and tx_ring.used_pending() == 0:
                self.stats["tx_full"] += 1
                tx_ring.set_interrupts(True)
                if tap_watched:
                    ep.modify(self.tap, 0)
                    tap_watched = False
                if tx_ring.used_pending():  # completed meanwhile: the interrupt may not come
                    tx_ring.set_interrupts(False)
                    ep.modify(self.tap, select.EPOLLIN)
                    tap_watched = True
            elif not tap_watched:
                tx_ring.set_interrupts(False)
                ep.modify(self.tap, select.EPOLLIN)
                tap_watched = True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("socket")
    p.add_argument("ifname")
    p.add_argument("--time", type=float, default=600.0, help="hard bound on the front end's life, seconds")
    p.add_argument("--queue", type=int, default=256, help="ring size (a power of two)")
    p.add_argument("--buf", type=int, default=65536 + 1024, help="bytes per buffer (header included)")
    a = p.parse_args()
    if a.queue <= 0 or a.queue & (a.queue - 1) or a.queue > 32768:
        p.error("--queue: a power of two up to 32768")
    if not 2048 <= a.buf <= 1 << 20:
        p.error("--buf: 2048 to 1048576 bytes")
    front = Front(a.socket, a.ifname, a.queue, a.buf)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGUSR1, lambda *_: sys.stderr.write(front.state() + "\n"))
    features = front.setup()
    if not front.mergeable and a.buf < front.hdr_len + MAX_FRAME:
        p.error(f"--buf: without mergeable receive buffers a buffer holds {front.hdr_len + MAX_FRAME} bytes")
    sys.stdout.write(f"ready features={features:#x} hdr={front.hdr_len}\n")
    sys.stdout.flush()
    t0, c0 = time.monotonic(), os.times()
    try:
        front.run(a.time)
    finally:
        c1 = os.times()
        stats = dict(front.stats, seconds=round(time.monotonic() - t0, 2),
                     user_s=round(c1.user - c0.user, 2), sys_s=round(c1.system - c0.system, 2))  # fmt: skip
        sys.stderr.write(" ".join(f"{k}={v}" for k, v in stats.items()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
