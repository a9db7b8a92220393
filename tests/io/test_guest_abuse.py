"""A whole Dataplane fed by a guest over a real UNIX socketpair (qemu's stream framing), as an untrusted guest
would use it: bursts, oversized datagrams, recycled echo ids, random source addresses, a vanishing guest.
Host peers are real loopback sockets; the echo test runs in a namespace of its own (ping sockets need
net.ipv4.ping_group_range, which is per namespace)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from typing import Any

import dpkt
import pytest

from passtd.dataplane.core.flowtable import PROTO_ICMP, PROTO_UDP
from passtd.dataplane.io.dataplane import Dataplane
from passtd.dataplane.io.netns import open_netns, run_in_netns
from passtd.dataplane.io.tap.qemu_stream import QemuStreamBackend
from passtd.dataplane.packets.arp import ARP_REQUEST, build_arp
from passtd.dataplane.packets.ethernet import BROADCAST, ETH_P_ARP, ETH_P_IP, build_ethernet
from passtd.dataplane.packets.icmp import ICMP_ECHO_REQUEST, build_echo, build_icmp4_packet
from passtd.dataplane.packets.udp import build_udp4
from tests.helpers.tcpfake import CTX, GUEST4, GW4

GUEST_MAC = bytes.fromhex("02000000a001")
OUR_MAC = CTX.our_mac
LOOP4 = "127.0.0.1"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class GuestRig:
    """The guest's end of qemu's stream socket, and the Dataplane serving the other end."""

    def __init__(self, **dataplane_kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.guest, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.guest.setblocking(False)
        self.dp = Dataplane(CTX, self.loop, **dataplane_kw)
        self.dp.attach(QemuStreamBackend(theirs, self.loop))
        self._rx = bytearray()

    def send(self, frames: list[bytes]) -> None:
        """All frames in one write: the dataplane reads them in one go."""
        data = b"".join(struct.pack("!I", len(f)) + f for f in frames)
        self.guest.setblocking(True)
        self.guest.sendall(data)
        self.guest.setblocking(False)

    def run(self, seconds: float = 0.05) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def frames(self) -> list[bytes]:
        """Every whole frame the dataplane wrote so far."""
        while True:
            try:
                chunk = self.guest.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._rx += chunk
        out = []
        while len(self._rx) >= 4:
            (n,) = struct.unpack_from("!I", self._rx)
            if len(self._rx) < 4 + n:
                break
            out.append(bytes(self._rx[4 : 4 + n]))
            del self._rx[: 4 + n]
        return out

    def run_until(self, done: Callable[[], bool], timeout: float = 2.0) -> None:
        for _ in range(int(timeout / 0.01)):
            if done():
                return
            self.run(0.01)

    def close(self) -> None:
        self.dp.close()
        self.guest.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


@pytest.fixture
def rig() -> Iterator[GuestRig]:
    r = GuestRig()
    try:
        yield r
    finally:
        r.close()


def udp_frame(sport: int, dport: int, payload: bytes, src: bytes = GUEST4, dst: bytes = GW4) -> bytes:
    return build_ethernet(OUR_MAC, GUEST_MAC, ETH_P_IP, build_udp4(src, dst, sport, dport, payload))


def receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOP4, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.settimeout(1)
    return sock


def drain(sock: socket.socket) -> list[bytes]:
    sock.settimeout(0.2)
    out = []
    try:
        while True:
            out.append(sock.recv(70000))
    except TimeoutError:
        return out


# -- 14.1: an oversized datagram after a burst never carries another flow's bytes -------------------------


@pytest.mark.parametrize("big", [65001, 65100, 65507])
def test_oversized_datagram_after_a_burst_keeps_every_flow_its_own_bytes(rig: GuestRig, big: int) -> None:
    rx1, rx2 = receiver(), receiver()
    p1, p2 = rx1.getsockname()[1], rx2.getsockname()[1]
    rig.send([udp_frame(40001, p1, b"warm"), udp_frame(40002, p2, b"warm")])  # both flows open already
    rig.run(0.05)
    assert drain(rx1) == drain(rx2) == [b"warm"]
    first = [bytes([i]) * 1400 for i in range(10)]
    huge = b"H" * big
    after = [bytes([100 + i]) * 1400 for i in range(5)]
    rig.send(
        [udp_frame(40001, p1, p) for p in first]
        + [udp_frame(40002, p2, huge)]
        + [udp_frame(40001, p1, p) for p in after]
    )
    rig.run(0.1)
    try:
        assert drain(rx2) == [huge]  # exactly its own payload, once (before: flow 1's bytes)
        assert drain(rx1) == first + after  # nothing of the batch dropped
        assert rig.errors == []
    finally:
        rx1.close()
        rx2.close()


# -- 14.7: frames already read are handled without waiting for more bytes ---------------------------------


def arp_request(tpa: bytes) -> bytes:
    return build_ethernet(
        BROADCAST, GUEST_MAC, ETH_P_ARP, build_arp(ARP_REQUEST, GUEST_MAC, GUEST4, bytes(6), tpa)
    )


def test_a_burst_of_frames_in_one_write_is_answered_whole(rig: GuestRig) -> None:
    rig.send([arp_request(GW4)] * 200)
    got: list[bytes] = []
    rig.run_until(lambda: len(got.__iadd__(rig.frames())) >= 200, timeout=2.0)
    assert len(got) == 200
    assert all(dpkt.ethernet.Ethernet(f).type == ETH_P_ARP for f in got)
    assert rig.errors == []


# -- 14.4: learned guest source addresses are bounded -------------------------------------------------------


def test_random_source_addresses_are_capped_and_counted(rig: GuestRig) -> None:
    rx = receiver()
    port = rx.getsockname()[1]
    sources = [IPv4Address(0x0A4D0000 + i).packed for i in range(1, 2001)]  # 10.77.x.y
    for i in range(0, len(sources), 200):
        rig.send([udp_frame(40000, port, b"x", src=s) for s in sources[i : i + 200]])
        rig.run(0.02)
    rx.close()
    learned = rig.dp.guest.addrs4
    assert 0 < len(learned) <= rig.dp.limits.guest_addresses4.max
    assert rig.dp.stats.dropped["limit.guest_addresses"] > 0
    assert rig.errors == []


# -- 14.3: UDP flows stop at their cap, counted, and the data path goes on ---------------------------------


def test_udp_flows_beyond_the_cap_are_refused_and_counted() -> None:
    r = GuestRig()
    try:
        cap = r.dp.limits.udp.max
        assert 0 < cap < r.dp.limits.open_files
        r.dp.flows.set_cap(PROTO_UDP, 20)  # a small cap, so the test stays quick
        rx = receiver()
        port = rx.getsockname()[1]
        r.send([udp_frame(41000 + i, port, b"%d" % i) for i in range(50)])
        r.run(0.1)
        assert len(drain(rx)) == 20
        assert r.dp.limits.udp.used == 20
        assert r.dp.stats.dropped["limit.udp_flows"] == 30
        unreachable = [f for f in r.frames() if f[23] == 1]  # ICMP port unreachable, one per refused flow
        assert len(unreachable) == 30
        icmp = dpkt.ethernet.Ethernet(unreachable[0]).data.data
        assert (icmp.type, icmp.code) == (3, 3)
        rx.close()
        assert r.errors == []
    finally:
        r.close()


# -- 14.8: a guest that goes away takes its flows with it --------------------------------------------------


def tcp_syn(sport: int, dport: int) -> bytes:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=1000, flags=dpkt.tcp.TH_SYN, win=65535)
    ip = dpkt.ip.IP(src=GUEST4, dst=GW4, p=dpkt.ip.IP_PROTO_TCP, ttl=64, data=tcp)
    ip.len = len(ip)
    return build_ethernet(OUR_MAC, GUEST_MAC, ETH_P_IP, bytes(ip))


def peer_saw(conn: socket.socket) -> str:
    conn.settimeout(1)
    try:
        return "eof" if conn.recv(10) == b"" else "data"
    except ConnectionResetError:
        return "reset"
    finally:
        conn.close()


def test_a_departed_guest_leaves_no_host_socket_behind() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((LOOP4, 0))
    server.listen(64)
    server.setblocking(False)
    tport = server.getsockname()[1]
    rx = receiver()
    uport = rx.getsockname()[1]
    r = GuestRig()
    try:
        baseline = open_fds()
        r.send(
            [udp_frame(42000 + i, uport, b"u") for i in range(10)]
            + [tcp_syn(43000 + i, tport) for i in range(10)]
        )
        r.run_until(lambda: len(r.dp.flows) >= 20)
        r.run(0.1)
        assert open_fds() >= baseline + 20
        accepted = []
        for _ in range(10):
            try:
                accepted.append(server.accept()[0])
            except BlockingIOError:
                break
        r.guest.close()  # qemu went away mid-transfer
        r.run_until(lambda: len(r.dp.flows) == 0, timeout=1.0)
        assert len(r.dp.flows) == 0
        assert r.dp.stats.handled["guest.departed.flows_closed"] == 20
        assert [peer_saw(conn) for conn in accepted] == ["reset"] * len(accepted)  # not a hang
        assert open_fds() <= baseline - 1  # every host socket closed, and the guest's end of the pair
        assert r.errors == []
    finally:
        rx.close()
        server.close()
        r.dp.close()
        r.loop.close()


# -- 14.2: a recycled echo id from another source leaks no ping socket -------------------------------------


def echo_frame(src: bytes, ident: int, seq: int) -> bytes:
    message = build_echo(ICMP_ECHO_REQUEST, ident, seq, b"ping")
    return build_ethernet(OUR_MAC, GUEST_MAC, ETH_P_IP, build_icmp4_packet(src, GW4, message))


def _echo_scenario() -> tuple[int, int, int, int]:
    r = GuestRig()
    try:
        r.run(0.01)
        baseline = open_fds()
        sources = [GUEST4, IPv4Address("10.77.0.9").packed]
        for i in range(20):
            r.send([echo_frame(sources[i % 2], 7, i)])
            r.run(0.02)
        replies = [f for f in r.frames() if f[23] == 1]
        during = open_fds() - baseline
        echo_flows = sum(1 for f in r.dp.flows if f.proto == PROTO_ICMP)
        r.dp.close()
        after = open_fds() - baseline
        return during, echo_flows, after, len(replies)
    finally:
        r.guest.close()
        r.loop.close()


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")
@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed")
def test_a_recycled_echo_id_from_another_source_leaks_no_socket(netns_name: str) -> None:
    sysctl = ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"]
    for argv in (
        ["ip", "-n", netns_name, "link", "set", "lo", "up"],
        ["ip", "netns", "exec", netns_name, *sysctl],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=10)
    netns_fd = open_netns(netns_name)
    try:
        during, echo_flows, after, replies = run_in_netns(netns_fd, _echo_scenario)
    finally:
        os.close(netns_fd)
    assert replies == 20  # every request answered, from either source
    assert echo_flows == 1
    assert during <= 1  # one ping socket: the flow in use (before the fix: one per switch of source)
    assert after <= 0
