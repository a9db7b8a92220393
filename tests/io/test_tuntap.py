"""TunTapBackend: batching and error semantics over a SEQPACKET socketpair (one read = one frame, like a tap),
then a real tap in a test namespace: the kernel's ARP request comes out, our ARP reply goes in."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from passtd.dataplane.core.context import Context, Ip4Net
from passtd.dataplane.io.netns import configure_netns, create_tap, open_netns, run_in_netns
from passtd.dataplane.io.tap.base import TapBackend
from passtd.dataplane.io.tap.tuntap import FRAME_BUF_SIZE, TunTapBackend
from passtd.dataplane.packets.arp import ARP_REPLY, ARP_REQUEST, build_arp, parse_arp
from passtd.dataplane.packets.ethernet import (
    BROADCAST,
    ETH_P_ARP,
    ETH_P_IP,
    build_ethernet,
    mac_to_str,
    parse_ethernet,
)
from passtd.dataplane.packets.ipv4 import parse_ipv4

OUR_MAC = bytes.fromhex("9a559a559a55")


def as_backend(backend: TunTapBackend) -> TapBackend:
    """mypy checks here that TunTapBackend satisfies the TapBackend protocol."""
    return backend


@pytest.fixture
def pair() -> Iterator[tuple[TunTapBackend, socket.socket]]:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    backend = TunTapBackend(os.dup(ours.fileno()))
    ours.close()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    peer.settimeout(2)
    try:
        yield backend, peer
    finally:
        backend.close()
        peer.close()


def test_recv_batch_exact_frames_and_limit(pair: tuple[TunTapBackend, socket.socket]) -> None:
    backend, peer = pair
    tap = as_backend(backend)
    assert os.get_blocking(tap.fileno()) is False
    assert tap.recv_batch(8) == []
    sent = [bytes([i]) * (60 + i) for i in range(5)]
    for frame in sent:
        peer.send(frame)
    first = tap.recv_batch(3)
    assert [bytes(f) for f in first] == sent[:3]
    rest = tap.recv_batch(8)
    assert [bytes(f) for f in rest] == sent[3:]
    assert tap.recv_batch(8) == []


def test_recv_batch_views_stay_valid_within_the_batch(pair: tuple[TunTapBackend, socket.socket]) -> None:
    backend, peer = pair
    big = os.urandom(65534)
    peer.send(big)
    peer.send(b"\x01" * 64)
    frames = backend.recv_batch(4)
    # each frame has its own buffer: reading the second did not overwrite the first
    assert bytes(frames[0]) == big
    assert bytes(frames[1]) == b"\x01" * 64
    assert all(isinstance(f, memoryview) for f in frames)
    assert frames[0].obj is not frames[1].obj
    assert len(frames[0].obj) >= FRAME_BUF_SIZE  # type: ignore[arg-type]


def test_recv_eof_after_the_last_frames(pair: tuple[TunTapBackend, socket.socket]) -> None:
    backend, peer = pair
    peer.send(b"last frame!")
    peer.send(b"really last")
    peer.close()
    # frames read before the end are handed over first, the EOF comes with the next call
    assert [bytes(f) for f in backend.recv_batch(8)] == [b"last frame!", b"really last"]
    with pytest.raises(EOFError):
        backend.recv_batch(8)
    with pytest.raises(EOFError):
        backend.recv_batch(1)


def test_send_batch_and_drops_when_full(pair: tuple[TunTapBackend, socket.socket]) -> None:
    backend, peer = pair
    frames: list[bytes | bytearray | memoryview] = [b"a" * 60, bytearray(b"b" * 70), memoryview(b"c" * 80)]
    backend.send_batch(frames)
    assert [peer.recv(100) for _ in range(3)] == [b"a" * 60, b"b" * 70, b"c" * 80]
    assert backend.dropped_tx == 0
    # fill the peer's queue: writes start failing with EAGAIN and are counted, never raised
    frame = b"x" * 4000
    backend.send_batch([frame] * 5000)
    assert 0 < backend.dropped_tx < 5000
    delivered = 0
    peer.setblocking(False)
    try:
        while True:
            assert peer.recv(8000) == frame
            delivered += 1
    except BlockingIOError:
        pass
    assert delivered + backend.dropped_tx == 5000


def test_close_is_idempotent(pair: tuple[TunTapBackend, socket.socket]) -> None:
    backend, _peer = pair
    fd = backend.fileno()
    backend.close()
    backend.close()
    assert backend.fileno() == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(EOFError):
        backend.recv_batch(4)
    backend.send_batch([b"z" * 60, b"y" * 60])
    assert backend.dropped_tx == 2


def test_closed_fd_under_us_is_eof() -> None:
    ours, _peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = os.dup(ours.fileno())
    backend = TunTapBackend(fd)
    ours.close()
    _peer.close()
    os.close(fd)
    try:
        with pytest.raises(EOFError):
            backend.recv_batch(2)
    finally:
        backend._fd = -1  # already closed above


# --- root: a real tap in a test namespace -----------------------------------------------------------------


def read_until(backend: TunTapBackend, want: str, deadline: float) -> memoryview:
    """Frames from the namespace until one matches `want` ("arp" or "ipv4"), within the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {want} frame from the namespace in time"
        ready, _, _ = select.select([backend.fileno()], [], [], remaining)
        if not ready:
            continue
        for frame in backend.recv_batch(16):
            eth = parse_ethernet(frame)
            if want == "arp" and eth.ethertype == ETH_P_ARP:
                return memoryview(bytes(frame))
            if want == "ipv4" and eth.ethertype == ETH_P_IP:
                return memoryview(bytes(frame))


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces and taps")
@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="/dev/net/tun is missing")
@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed")
def test_arp_over_a_real_tap(netns_name: str) -> None:
    gw = IPv4Address("10.200.1.1")
    ctx = Context(mtu=1500, ip4=Ip4Net(IPv4Address("10.200.1.2"), 24, gw))
    netns_fd = open_netns(netns_name)
    udp: socket.socket | None = None
    backend = TunTapBackend(create_tap(netns_fd, "tap0", 1500))
    try:
        configure_netns(netns_fd, "tap0", ctx)
        # a UDP socket created inside the namespace sends a datagram toward the gateway: the kernel must ARP
        udp = run_in_netns(netns_fd, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        udp.setblocking(False)
        udp.sendto(b"hello gateway", (str(gw), 9))
        deadline = time.monotonic() + 5
        req_frame = read_until(backend, "arp", deadline)
        eth = parse_ethernet(req_frame)
        req = parse_arp(eth.payload)
        assert eth.dst == BROADCAST
        assert req.op == ARP_REQUEST
        assert req.tpa == gw.packed
        assert req.spa == IPv4Address("10.200.1.2").packed
        guest_mac = req.sha

        reply = build_ethernet(
            guest_mac, OUR_MAC, ETH_P_ARP, build_arp(ARP_REPLY, OUR_MAC, gw.packed, guest_mac, req.spa)
        )
        backend.send_batch([reply])
        assert backend.dropped_tx == 0

        # the held datagram now leaves, addressed to the MAC we announced
        ip_frame = read_until(backend, "ipv4", deadline)
        eth = parse_ethernet(ip_frame)
        assert eth.dst == OUR_MAC
        assert eth.src == guest_mac
        assert parse_ipv4(eth.payload).dst == gw.packed

        out = subprocess.run(
            ["ip", "-n", netns_name, "-j", "neigh", "show", "dev", "tap0"],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        neigh = {n["dst"]: n for n in json.loads(out)}
        assert neigh[str(gw)]["lladdr"] == mac_to_str(OUR_MAC)
        assert neigh[str(gw)]["state"] == ["REACHABLE"]
    finally:
        if udp is not None:
            udp.close()
        backend.close()
        os.close(netns_fd)
