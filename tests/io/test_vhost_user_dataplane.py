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
from passtd.dataplane.io.vhost_user.device import FEATURES
from passtd.dataplane.io.vhost_user.net import NET_F_GUEST_TSO4, NET_F_GUEST_TSO6
from passtd.dataplane.packets.arp import build_arp
from passtd.dataplane.packets.checksum import checksum, l4_checksum4
from passtd.dataplane.packets.ethernet import build_ethernet
from passtd.dataplane.packets.ipv4 import build_ipv4_header
from passtd.dataplane.packets.tcp import syn_options, tcp_checksum_ok
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
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    """`request.param`, when parametrized indirectly: the features the guest's driver takes."""
    features: int | None = getattr(request, "param", None)
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
        fe.setup(features=features)
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


def download(s: Setup, size: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The guest connects to a loopback server through the gateway, says hello, and reads `size` bytes;
    returns what arrived and the (virtio-net header, frame) of every data segment."""
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
        blob = bytes(range(256)) * (size // 256)
        conn.sendall(blob)
        got = bytearray()
        segments = []
        for _ in range(60):
            s.run(0.02)
            for hdr, frame in s.frames():
                if frame[23] != 6 or frame[34 + 13] & 0x02:
                    continue
                segments.append((hdr, frame))
                data_off = (frame[34 + 12] >> 4) * 4
                got += frame[34 + data_off :]
            if len(got) >= len(blob):
                break
            s.send(ip_frame(6, tcp_segment(40000, port, iss + 21, their_seq + len(got), 0x10)))
        assert bytes(got) == blob
        return bytes(got), segments
    finally:
        if conn is not None:
            conn.close()
        listener.close()


def test_tcp_both_ways_with_segmentation_offload_to_the_guest(setup: Setup) -> None:
    """Host→guest data leaves as super-segments (GSO TCPV4 in the header, spread over mergeable buffers);
    the guest's data arrives at the host socket."""
    _, segments = download(setup, 102400)
    gso = [hdr for hdr, _ in segments if hdr[1] == 1]  # VIRTIO_NET_HDR_GSO_TCPV4
    assert gso, "no super-segment reached the guest"
    for hdr in gso:  # cut at the guest's MSS by the guest, spread over several receive buffers
        assert struct.unpack_from("<H", hdr, 4)[0] == 1460 and hdr[10] > 1
    assert setup.backend.drops == {}


NO_TSO = FEATURES & ~(1 << NET_F_GUEST_TSO4 | 1 << NET_F_GUEST_TSO6)


@pytest.mark.parametrize("setup", [NO_TSO], indirect=True)
def test_a_guest_without_tso_gets_mss_sized_frames_with_complete_checksums(setup: Setup) -> None:
    """Super-segments are cut here: every piece fits the MTU, and the pieces cut here (header asking for
    nothing) carry complete IP and TCP checksums; single segments may still leave the checksum to the guest,
    which took GUEST_CSUM."""
    _, segments = download(setup, 102400)
    cut = 0
    for hdr, frame in segments:
        assert hdr[1] == 0 and len(frame) <= 1514
        ip = frame[14:34]
        assert struct.unpack_from("!H", ip, 2)[0] == len(frame) - 14 and checksum(ip) == 0
        if hdr[0] == 0:
            cut += 1
            assert tcp_checksum_ok(GW.packed, GUEST.packed, memoryview(frame)[34:])
    assert cut >= 60
    assert setup.backend.drops == {} and setup.backend.dropped_tx == 0
