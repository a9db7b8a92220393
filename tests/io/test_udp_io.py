"""UdpRelay over real loopback sockets: lean guest → host sends, UDP GSO batching that keeps every datagram
and its order, host → guest frames from the flow template, forwarded-port peers; then, as root, proof that a
tap with IFF_VNET_HDR takes a UDP frame whose checksum is left to the kernel (NEEDS_CSUM)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

import dpkt
import pytest

from passtd.dataplane.core.context import Context, Guest, Ip4Net
from passtd.dataplane.core.flowtable import Flow, FlowTable
from passtd.dataplane.core.fwd import Listener
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.udp import UdpFlow
from passtd.dataplane.io.netns import configure_netns, create_tap, open_netns, run_in_netns
from passtd.dataplane.io.udp import UdpRelay
from passtd.dataplane.packets.ethernet import ETH_P_IP, build_ethernet
from passtd.dataplane.packets.udp import (
    UdpHeader,
    build_udp4,
    udp_headers,
    udp_headers_partial,
    udp_offload_vnet_header,
    udp_template,
)
from passtd.dataplane.packets.vnet import ZERO_HDR
from tests.helpers.tcpfake import CTX, GUEST4, GW4

LOOP4 = "127.0.0.1"


class NullLog:
    def debug(self, event: str, **kw: Any) -> None:
        pass


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    relay: UdpRelay
    flows: FlowTable
    stats: Stats
    frames: list[tuple[int, bytes]] = field(default_factory=list)  # (ethertype, IP packet) toward the guest
    events: list[tuple[str, int, str]] = field(default_factory=list)

    def run(self, seconds: float = 0.05) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))


@pytest.fixture
def harness() -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    flows, stats = FlowTable(), Stats()
    h = Harness(loop, None, flows, stats)  # type: ignore[arg-type]

    def to_tap(ethertype: int, packet: bytes, offload: int = -1, payload: bytes | memoryview = b"") -> None:
        assert offload == -1
        h.frames.append((ethertype, packet + bytes(payload)))  # copied now: the relay reuses its buffer

    def emit(kind: str, flow: Flow, state: str, reason: str) -> None:
        h.events.append((kind, flow.flow_id, reason))

    h.relay = UdpRelay(CTX, loop, flows, stats, Guest(), to_tap, lambda now: None, emit, NullLog())
    try:
        yield h
    finally:
        h.relay.close()
        loop.close()


def receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOP4, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.settimeout(2)
    return sock


def drain(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65536) for _ in range(count)]


def guest_datagram(h: Harness, sport: int, dport: int, payload: bytes, dst: bytes = GW4) -> None:
    h.relay.from_guest(
        False, GUEST4, dst, UdpHeader(sport, dport, 8 + len(payload), memoryview(payload)), 1.0
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


def test_lone_datagrams_go_at_once_through_one_flow(harness: Harness) -> None:
    h = harness  # no tap batch around them (request/response): never gathered
    rx = receiver()
    sport, dport = free_port(), rx.getsockname()[1]
    for i in range(5):
        guest_datagram(h, sport, dport, b"ping %d" % i)
        assert rx.recv(100) == b"ping %d" % i  # sent inside from_guest, no loop turn needed
    flow = h.flows.get((17, bytes(10) + b"\xff\xff" + GW4, dport, sport))
    assert isinstance(flow, UdpFlow)
    assert (flow.packets_from_guest, flow.bytes_from_guest) == (5, 5 * 6)
    assert [e[0] for e in h.events] == ["opened"]
    assert h.relay.gso_sends == 0
    rx.close()


def test_a_burst_is_one_gso_send_with_every_datagram_in_order(harness: Harness) -> None:
    h = harness
    rx = receiver()
    sport, dport = free_port(), rx.getsockname()[1]
    sent = [bytes([i]) * 1400 for i in range(100)] + [b"short"] + [b"x" * 2000, b"y" * 2000, b"", b"z"]
    h.relay.begin_batch(len(sent))  # everything is one tap batch
    for payload in sent:
        guest_datagram(h, sport, dport, payload)
    h.relay.end_batch()  # the gathered tail leaves at the end of the batch
    assert drain(rx, len(sent)) == sent
    assert h.relay.gso_sends >= 3  # 1400-byte runs (at most 46 per 64 KiB), then the 2000-byte pair
    assert h.relay.gso_datagrams >= 98
    rx.settimeout(0.05)
    with pytest.raises(TimeoutError):
        rx.recv(10)
    rx.close()


def test_interleaved_flows_keep_their_own_order(harness: Harness) -> None:
    h = harness
    rx1, rx2 = receiver(), receiver()
    s1, s2 = free_port(), free_port()
    h.relay.begin_batch(40)
    for i in range(30):
        guest_datagram(h, s1, rx1.getsockname()[1], b"a%03d" % i)
        if i % 3 == 0:
            guest_datagram(h, s2, rx2.getsockname()[1], b"b%03d" % i)
    h.relay.end_batch()
    assert drain(rx1, 30) == [b"a%03d" % i for i in range(30)]
    assert drain(rx2, 10) == [b"b%03d" % i for i in range(0, 30, 3)]
    rx1.close()
    rx2.close()


class RefusesGso:
    """A socket whose route cannot segment (as over IPsec, or without checksum offload)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: Any) -> int:
        return self.sock.send(data)

    def sendmsg(self, buffers: Any, ancdata: Any = ()) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def test_a_route_without_gso_falls_back_to_single_sends(harness: Harness) -> None:
    h = harness
    rx = receiver()
    sport, dport = free_port(), rx.getsockname()[1]
    guest_datagram(h, sport, dport, b"first")
    assert rx.recv(100) == b"first"
    flow = h.relay.active[next(iter(h.relay.active))]
    assert flow.sock is not None
    flow.sock = RefusesGso(flow.sock)  # type: ignore[arg-type]
    h.relay.begin_batch(6)
    for i in range(5):
        guest_datagram(h, sport, dport, b"%05d" % i)
    h.relay.end_batch()
    assert drain(rx, 5) == [b"%05d" % i for i in range(5)]
    assert flow.no_gso and h.relay.gso_sends == 0
    h.relay.begin_batch(2)
    guest_datagram(h, sport, dport, b"after")  # from now on sent one by one, at once, even in a batch
    assert rx.recv(100) == b"after"
    h.relay.end_batch()
    rx.close()


def test_replies_reach_the_guest_from_the_address_it_asked(harness: Harness) -> None:
    h = harness
    peer = receiver()
    sport, dport = free_port(), peer.getsockname()[1]
    guest_datagram(h, sport, dport, b"hello")
    data, addr = peer.recvfrom(100)
    assert (data, addr) == (b"hello", (LOOP4, sport))  # the guest's own port, when free on the host
    replies = [b"", b"r", b"odd!!", bytes(range(256)) * 200]
    for reply in replies:
        peer.sendto(reply, addr)
    h.run()
    assert len(h.frames) == len(replies)
    for (ethertype, packet), reply in zip(h.frames, replies, strict=True):
        assert ethertype == ETH_P_IP
        assert packet == build_udp4(GW4, GUEST4, dport, sport, reply)  # loopback shows as the gateway
        ip = dpkt.ip.IP(packet)
        assert (ip.data.sport, ip.data.dport, ip.data.data) == (dport, sport, reply)
    flow = h.relay.active[next(iter(h.relay.active))]
    assert (flow.packets_to_guest, flow.bytes_to_guest) == (4, sum(map(len, replies)))
    peer.close()


def test_forwarded_port_peers_become_flows_and_get_the_guests_replies(harness: Harness) -> None:
    h = harness
    lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    lsock.bind((LOOP4, 0))
    lport = lsock.getsockname()[1]
    peers = [receiver(), receiver()]
    for i, peer in enumerate(peers):
        peer.sendto(b"from peer %d" % i, (LOOP4, lport))
        peer.sendto(b"again %d" % i, (LOOP4, lport))
    time.sleep(0.05)
    h.relay.on_listener(Listener(None, None, lport, 5353), lsock)
    assert len(h.frames) == 4 and len(h.relay.active) == 2
    by_port: dict[int, list[bytes]] = {}
    for _, packet in h.frames:
        ip = dpkt.ip.IP(packet)
        assert (ip.src, ip.dst, ip.data.dport) == (GW4, CTX.ip4.addr.packed if CTX.ip4 else b"", 5353)
        by_port.setdefault(ip.data.sport, []).append(ip.data.data)
    assert by_port == {
        p.getsockname()[1]: [b"from peer %d" % i, b"again %d" % i] for i, p in enumerate(peers)
    }
    for i, peer in enumerate(peers):  # the guest answers each peer: out of the listening socket, to that peer
        guest_datagram(h, 5353, peer.getsockname()[1], b"answer %d" % i)
        data, addr = peer.recvfrom(100)
        assert (data, addr) == (b"answer %d" % i, (LOOP4, lport))
    for flow in list(h.relay.active.values()):
        h.relay.close_flow(flow, "timeout")
    assert not h.relay.core.has_peers()
    assert lsock.fileno() >= 0  # the listener is not the flows' to close
    lsock.close()
    for peer in peers:
        peer.close()


# --- root: a real tap with a virtio-net header --------------------------------------------------------------


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces and taps")
@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="/dev/net/tun is missing")
@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed")
def test_tap_takes_udp_frames_whose_checksum_the_kernel_completes(netns_name: str) -> None:
    gw, addr = IPv4Address("10.200.7.1"), IPv4Address("10.200.7.2")
    ctx = Context(mtu=1500, ip4=Ip4Net(addr, 24, gw))
    netns_fd = open_netns(netns_name)
    tap_fd = create_tap(netns_fd, "tap0", 1500, vnet_hdr=True)
    sock: socket.socket | None = None
    try:
        configure_netns(netns_fd, "tap0", ctx)
        sock = run_in_netns(netns_fd, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((str(addr), 7000))
        sock.settimeout(2)
        link = json.loads(subprocess.run(["ip", "-n", netns_name, "-j", "link", "show", "tap0"], check=True,
                                         capture_output=True, text=True, timeout=10).stdout)  # fmt: skip
        tap_mac = bytes.fromhex(link[0]["address"].replace(":", ""))
        tpl = udp_template(gw.packed, addr.packed, 5000, 7000)

        def frame(packet: bytes) -> bytes:
            return build_ethernet(tap_mac, bytes.fromhex("9a559a559a55"), ETH_P_IP, packet)

        # control: the same partial checksum without NEEDS_CSUM is a bad checksum, and the kernel drops it
        bad = b"dropped: checksum not finished"
        os.writev(tap_fd, (ZERO_HDR, frame(udp_headers_partial(tpl, len(bad)) + bad)))
        full = b"complete checksum, plain header"
        os.writev(tap_fd, (ZERO_HDR, frame(udp_headers(tpl, full) + full)))
        for size in (1, 64, 1400, 1471):  # odd and even, up to the MTU
            payload = os.urandom(size)
            os.writev(
                tap_fd, (udp_offload_vnet_header(False), frame(udp_headers_partial(tpl, size)), payload)
            )
            if size == 1:
                assert sock.recvfrom(2000) == (full, (str(gw), 5000))
            data, peer = sock.recvfrom(2000)
            assert (data, peer) == (payload, (str(gw), 5000))
        sock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            sock.recv(2000)  # the control frame never arrived
    finally:
        if sock is not None:
            sock.close()
        os.close(tap_fd)
        os.close(netns_fd)


def test_with_a_vnet_sink_replies_leave_the_checksum_to_the_kernel() -> None:
    """Given `to_tap_vnet`, frames toward the guest carry NEEDS_CSUM and only the pseudo-header sum; what
    the kernel then completes is byte for byte the frame built without offload."""
    loop = asyncio.new_event_loop()
    got: list[tuple[bytes, int, bytes]] = []

    def to_tap(ethertype: int, packet: bytes, offload: int = -1, payload: bytes | memoryview = b"") -> None:
        raise AssertionError("the vnet sink takes every frame")

    def to_tap_vnet(vnet: bytes, ethertype: int, packet: bytes, payload: memoryview) -> None:
        got.append((vnet, ethertype, packet + bytes(payload)))

    relay = UdpRelay(CTX, loop, FlowTable(), Stats(), Guest(), to_tap, lambda now: None,
                     lambda *a: None, NullLog(), to_tap_vnet=to_tap_vnet)  # fmt: skip
    peer = receiver()
    try:
        sport, dport = free_port(), peer.getsockname()[1]
        relay.from_guest(False, GUEST4, GW4, UdpHeader(sport, dport, 9, memoryview(b"q")), 1.0)
        _, addr = peer.recvfrom(10)
        replies = [b"a", b"bb", os.urandom(1000)]
        for reply in replies:
            peer.sendto(reply, addr)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert len(got) == 3
        for (vnet, ethertype, packet), reply in zip(got, replies, strict=True):
            assert (vnet, ethertype) == (udp_offload_vnet_header(False), ETH_P_IP)
            assert packet[:20] + packet[28:] == build_udp4(GW4, GUEST4, dport, sport, reply)[:20] + reply
            tpl = udp_template(GW4, GUEST4, dport, sport)
            assert packet[:28] == udp_headers_partial(tpl, len(reply))
    finally:
        peer.close()
        relay.close()
        loop.close()
