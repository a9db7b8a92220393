"""A tap device in the benchmark's guest namespace, relayed to a passt-mode UNIX socket (qemu's format).

This stands in for qemu in the passt-mode lines: qemu under TCG moves 40-80 MB/s, so it would measure qemu,
not the translator. With this relay the guest side is the kernel's own TCP stack, the same for passt and
passtd, and the relay's cost (one Python read and one write per frame, frames prefixed with a 32-bit
big-endian length as qemu's `-netdev stream` sends them) is paid equally by both. It caps what either can
reach, so the passt-mode lines compare the two tools with each other, not with pasta mode.

    relay.py SOCKET IFNAME [--time SECONDS]     (run inside the guest namespace; prints `ready`)
"""

from __future__ import annotations

import argparse
import fcntl
import os
import selectors
import socket
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
LEN = struct.Struct("!I")
BATCH = 64


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def connect(path: str, deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run(path: str, ifname: str, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    tap = open_tap(ifname)
    sock = connect(path, time.monotonic() + 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sel = selectors.DefaultSelector()
    sel.register(tap, selectors.EVENT_READ, "tap")
    sel.register(sock, selectors.EVENT_READ, "sock")
    rbuf = bytearray(8 << 20)
    view = memoryview(rbuf)
    have = 0
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            if key.data == "tap":
                parts: list[bytes] = []
                for _ in range(BATCH):
                    try:
                        frame = os.read(tap, 65536 + 14)
                    except BlockingIOError:
                        break
                    parts.append(LEN.pack(len(frame)))
                    parts.append(frame)
                if parts:
                    sock.sendall(b"".join(parts))
            else:
                n = sock.recv_into(view[have:])
                if n == 0:
                    return 0
                have += n
                off = 0
                while have - off >= 4:
                    (size,) = LEN.unpack_from(rbuf, off)
                    if have - off - 4 < size:
                        break
                    try:
                        os.write(tap, view[off + 4 : off + 4 + size])
                    except BlockingIOError:
                        pass  # the guest's queue is full: drop, as a NIC would
                    off += 4 + size
                if off:
                    view[: have - off] = view[off:have]
                    have -= off
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("socket")
    p.add_argument("ifname")
    p.add_argument("--time", type=float, default=600.0, help="hard bound on the relay's life, seconds")
    a = p.parse_args()
    return run(a.socket, a.ifname, a.time)


if __name__ == "__main__":
    sys.exit(main())
