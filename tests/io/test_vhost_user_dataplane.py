"""The dataplane serving a guest over the vhost-user back-end, as the daemon will wire it (vnet=True: TCP
offloads go to the guest in the virtio-net header). The tests' front end plays qemu and the guest's driver,
and the guest's frames are written by hand; the host side is real loopback sockets.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from passtd.dataplane.core.context import Context, Ip4Net
from passtd.dataplane.io.dataplane import Dataplane
from passtd.dataplane.io.vhost_user.backend import VhostUserBackend
from passtd.dataplane.packets.arp import build_arp
from passtd.dataplane.packets.checksum import l4_checksum4
from passtd.dataplane.packets.ethernet import build_ethernet
from passtd.dataplane.packets.ipv4 import build_ipv4_header
from passtd.dataplane.packets.tcp import syn_options
from passtd.dataplane.packets.udp import build_udp4
from tests.io.vhost_frontend import FrontEnd

GUEST, GW = IPv4Address("10.0.2.15"), IPv4Address("10.0.2.2")
GUEST_MAC = bytes.fromhex("525400123456")
ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806


@dataclass
class Setup:
    loop: asyncio.AbstractEventLoop
    dp: Dataplane
    backend: VhostUserBackend
    fe: FrontEnd

    def run(self, seconds: float = 0.05) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def send(self, frame: bytes) -> None:
        self.fe.tx(frame)
        self.fe.kick_queue(1)
        self.run()

    def frames(self) -> list[tuple[bytes, bytes]]:
        got = self.fe.read_rx()
        self.fe.post_rx(len(got) * 2 + 1, 2048)  # the driver refills what it took (and a little more)
        self.fe.kick_queue(0)
        return got


@pytest.fixture
def setup() -> Iterator[Setup]:
    loop = asyncio.new_event_loop()
    ctx = Context(mtu=1500, ip4=Ip4Net(GUEST, 24, GW))  # MTU 1500: super-segments are cut by the guest
    dp = Dataplane(ctx, loop, vnet=True)
    a, b = socket.socketpair()
    backend = VhostUserBackend(a, loop)
    dp.attach(backend)
    holder: list[Setup] = []
    fe = FrontEnd(b, lambda: holder[0].run(0.01), qsize=256)
    s = Setup(loop, dp, backend, fe)
    holder.append(s)
    try:
        fe.setup()
        fe.post_rx(128, 2048)
        fe.kick_queue(0)
        s.run()
        yield s
    finally:
        dp.close()
        fe.close()
        b.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def ip_frame(proto: int, l4: bytes) -> bytes:
    ip = build_ipv4_header(GUEST.packed, GW.packed, proto, len(l4))
    return build_ethernet(setup_gw_mac(), GUEST_MAC, ETH_P_IP, ip + l4)


def setup_gw_mac() -> bytes:
    return Context().our_mac


def tcp_segment(
    sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"", opts: bytes = b""
) -> bytes:
    hdr = (
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (5 + len(opts) // 4) << 4, flags, 65535, 0, 0)
        + opts
    )
    seg = bytearray(hdr + payload)
    struct.pack_into("!H", seg, 16, l4_checksum4(GUEST.packed, GW.packed, 6, seg))
    return bytes(seg)


def test_arp_and_udp_both_ways(setup: Setup) -> None:
    s = setup
    s.send(
        build_ethernet(
            b"\xff" * 6, GUEST_MAC, ETH_P_ARP, build_arp(1, GUEST_MAC, GUEST.packed, bytes(6), GW.packed)
        )
    )
    [(_, reply)] = s.frames()
    assert reply[12:14] == b"\x08\x06" and reply[:6] == GUEST_MAC
    assert reply[14 + 14 : 14 + 18] == GW.packed  # sender protocol address: the gateway answers
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        server.bind(("127.0.0.1", 0))
        server.settimeout(2)
        port = server.getsockname()[1]
        s.send(ip_frame(17, build_udp4(GUEST.packed, GW.packed, 4000, port, b"ping over vhost-user")[20:]))
        data, peer = server.recvfrom(100)
        assert data == b"ping over vhost-user"
        server.sendto(b"pong", peer)
        s.run(0.1)
        udp = [f for _, f in s.frames() if f[12:14] == b"\x08\x00" and f[23] == 17]
        assert len(udp) == 1 and udp[0].endswith(b"pong")
        assert struct.unpack_from("!HH", udp[0], 34) == (port, 4000)
    finally:
        server.close()


def test_tcp_both_ways_with_segmentation_offload_to_the_guest(setup: Setup) -> None:
    """Host→guest data leaves as super-segments (GSO TCPV4 in the header, spread over mergeable buffers);
    the guest's data arrives at the host socket."""
    s = setup
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn: socket.socket | None = None
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(2)
        port = listener.getsockname()[1]
        iss = 1000
        s.send(ip_frame(6, tcp_segment(40000, port, iss, 0, 0x02, opts=syn_options(1460, 7))))
        conn, _ = listener.accept()
        s.run(0.05)
        synack = [f for _, f in s.frames() if f[23] == 6]
        assert len(synack) == 1 and synack[0][34 + 13] == 0x12
        their_seq = struct.unpack_from("!I", synack[0], 34 + 4)[0] + 1
        s.send(ip_frame(6, tcp_segment(40000, port, iss + 1, their_seq, 0x10)))
        s.send(ip_frame(6, tcp_segment(40000, port, iss + 1, their_seq, 0x18, b"hello from the guest")))
        conn.settimeout(2)
        assert conn.recv(100) == b"hello from the guest"
        blob = bytes(range(256)) * 400  # 102 400 bytes
        conn.sendall(blob)
        got = bytearray()
        gso = 0
        for _ in range(40):
            s.run(0.02)
            for hdr, frame in s.frames():
                if frame[23] != 6 or frame[34 + 13] & 0x02:
                    continue
                if hdr[1] == 1:  # VIRTIO_NET_HDR_GSO_TCPV4, cut at the guest's MSS, over several buffers
                    assert struct.unpack_from("<HH", hdr, 4)[0] == 1460 and hdr[10] > 1
                    gso += 1
                data_off = (frame[34 + 12] >> 4) * 4
                got += frame[34 + data_off :]
            if len(got) >= len(blob):
                break
            s.send(ip_frame(6, tcp_segment(40000, port, iss + 21, their_seq + len(got), 0x10)))
        assert bytes(got) == blob
        assert gso >= 1, "no super-segment reached the guest"
        assert s.backend.drops == {}
    finally:
        if conn is not None:
            conn.close()
        listener.close()
