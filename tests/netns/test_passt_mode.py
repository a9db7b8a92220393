"""passt mode: a client that speaks qemu's stream protocol on passtd's UNIX socket."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import dpkt
import pytest

from passtd.dataplane.packets.arp import ARP_REQUEST, build_arp
from passtd.dataplane.packets.ethernet import BROADCAST, ETH_P_ARP, ETH_P_IP, build_ethernet
from passtd.dataplane.packets.ipv4 import build_ipv4_header
from passtd.dataplane.packets.udp import build_udp4
from tests.netns.conftest import HOST4, HOST_DNS, REMOTE4, Passtd, Topology, wait_for

pytestmark = pytest.mark.netns
GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")


def arp_request(target: str) -> bytes:
    payload = build_arp(ARP_REQUEST, GUEST_MAC, socket.inet_aton(HOST4), bytes(6), socket.inet_aton(target))
    return build_ethernet(BROADCAST, GUEST_MAC, ETH_P_ARP, payload)


def dhcp_discover(xid: int) -> bytes:
    msg = dpkt.dhcp.DHCP(chaddr=GUEST_MAC, xid=xid, opts=((dpkt.dhcp.DHCP_OPT_MSGTYPE, b"\x01"),))
    packet = build_udp4(bytes(4), b"\xff" * 4, 68, 67, bytes(msg))
    return build_ethernet(BROADCAST, GUEST_MAC, ETH_P_IP, packet)


def framed(frame: bytes) -> bytes:
    return struct.pack("!I", len(frame)) + frame


OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_guests() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


class Guest:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        OPEN.append(self.sock)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buf = b""

    def read_frame(self) -> bytes:
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack_from("!I", self.buf)
                if len(self.buf) >= 4 + n:
                    frame, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    return frame
            chunk = self.sock.recv(65536)
            assert chunk, "passtd closed the connection"
            self.buf += chunk

    def read_until(self, want: int, limit: int = 20) -> list[dpkt.ethernet.Ethernet]:
        """Read frames until `want` non-RA frames arrived (router advertisements come unsolicited)."""
        got: list[dpkt.ethernet.Ethernet] = []
        for _ in range(limit):
            eth = dpkt.ethernet.Ethernet(self.read_frame())
            if eth.type == dpkt.ethernet.ETH_TYPE_IP6:
                continue
            got.append(eth)
            if len(got) == want:
                return got
        raise AssertionError(f"only {len(got)} frames")


def start(topo: Topology, *extra: str) -> tuple[str, Passtd]:
    path = str(topo.tmp / "passt.sock")
    daemon = topo.passtd("passt", "-f", "-s", path, *extra)
    wait_for(lambda: daemon.proc.poll() is not None or os.path.exists(path), 10, "passt socket")
    assert daemon.proc.poll() is None, daemon.output()
    return path, daemon


def test_split_and_coalesced_frames(topo: Topology) -> None:
    path, daemon = start(topo, "--one-off")
    guest = Guest(path)
    # One ARP request delivered one byte per write: the framing must reassemble it.
    for byte in framed(arp_request(REMOTE4)):
        guest.sock.send(bytes([byte]))
        time.sleep(0.001)
    (reply,) = guest.read_until(1)
    assert reply.type == ETH_P_ARP and reply.src == OUR_MAC and reply.dst == GUEST_MAC
    assert reply.data.op == 2 and reply.data.spa == socket.inet_aton(REMOTE4) and reply.data.sha == OUR_MAC
    # Many frames in one write, the last one split across two writes.
    stream = b"".join(framed(arp_request(f"10.77.0.{i}")) for i in range(10, 20)) + framed(
        dhcp_discover(0x1234)
    )
    guest.sock.sendall(stream[:-7])
    time.sleep(0.05)
    guest.sock.sendall(stream[-7:])
    frames = guest.read_until(11)
    assert [f.data.spa for f in frames[:10]] == [socket.inet_aton(f"10.77.0.{i}") for i in range(10, 20)]
    offer = dpkt.dhcp.DHCP(frames[10].data.data.data)
    opts = dict(offer.opts)
    assert offer.xid == 0x1234 and offer.yiaddr == int.from_bytes(socket.inet_aton(HOST4), "big")
    assert opts[dpkt.dhcp.DHCP_OPT_MSGTYPE] == b"\x02"
    assert opts[dpkt.dhcp.DHCP_OPT_ROUTER] == socket.inet_aton(REMOTE4)
    assert opts[dpkt.dhcp.DHCP_OPT_DNS_SVRS] == socket.inet_aton(HOST_DNS)
    assert opts[26] == (65520).to_bytes(2, "big")
    guest.sock.close()
    assert daemon.proc.wait(10) == 0  # --one-off: the guest left, passtd exits


def hostile_frames() -> list[bytes]:
    ip = build_ipv4_header(socket.inet_aton(HOST4), socket.inet_aton(REMOTE4), 17, 8) + bytes(8)
    eth = lambda payload, et=ETH_P_IP: build_ethernet(BROADCAST, GUEST_MAC, et, payload)  # noqa: E731
    return [
        b"\x00" * 14,  # ethertype 0: not Ethernet II
        eth(b""),  # empty IPv4
        eth(ip[:19]),  # truncated IPv4 header
        eth(b"\x44" + ip[1:]),  # IHL below 5
        eth(b"\x4f" + ip[1:]),  # IHL past the packet
        eth(ip[:2] + b"\xff\xff" + ip[4:]),  # total length past the frame
        eth(ip[:20] + b"\x00\x44\x00\x43\x00\x04\x00\x00"),  # UDP length < 8
        eth(b"\x60" + bytes(39), 0x86DD),  # IPv6 with nothing after
        eth(bytes(10), 0x0806),  # truncated ARP
        eth(b"junk", 0x88B5),  # unknown ethertype
        eth(ip[:9] + b"\x99" + ip[10:]),  # unknown protocol
    ]


def test_hostile_frames_are_dropped_and_service_goes_on(topo: Topology) -> None:
    path, daemon = start(topo, "-d")
    guest = Guest(path)
    guest.sock.sendall(b"".join(framed(f) for f in hostile_frames()) + framed(arp_request(REMOTE4)))
    (reply,) = guest.read_until(1)
    assert reply.type == ETH_P_ARP
    out = daemon.output()
    for reason in ("eth.not_ethernet2", "ipv4.truncated", "ipv4.bad_ihl", "ipv4.bad_length", "udp.bad_length",
                   "arp.truncated"):  # fmt: skip
        assert f"reason={reason}" in out, reason
    # A stream that is out of step (impossible length) disconnects that guest only; the next one is served.
    guest.sock.sendall(struct.pack("!I", 3) + b"abc")
    assert guest.sock.recv(10) == b""
    guest2 = Guest(path)
    guest2.sock.sendall(framed(arp_request(REMOTE4)))
    assert guest2.read_until(1)[0].type == ETH_P_ARP
    assert daemon.stop() == 0


def test_second_guest_is_refused_while_one_is_connected(topo: Topology) -> None:
    path, _ = start(topo)
    first = Guest(path)
    first.sock.sendall(framed(arp_request(REMOTE4)))
    first.read_until(1)
    second = Guest(path)
    assert second.sock.recv(10) == b""
    first.sock.sendall(framed(arp_request(REMOTE4)))
    assert first.read_until(1)[0].type == ETH_P_ARP


def test_pcap_records_both_directions(topo: Topology) -> None:
    pcap = topo.tmp / "cap.pcap"
    path, daemon = start(topo, "-p", str(pcap))
    guest = Guest(path)
    guest.sock.sendall(framed(arp_request(REMOTE4)) + framed(dhcp_discover(7)))
    guest.read_until(2)
    assert daemon.stop() == 0
    with open(pcap, "rb") as f:
        frames = [dpkt.ethernet.Ethernet(buf) for _, buf in dpkt.pcap.Reader(f)]
    kinds = [(e.src, e.type) for e in frames if e.type != dpkt.ethernet.ETH_TYPE_IP6]
    assert kinds == [
        (GUEST_MAC, ETH_P_ARP),
        (GUEST_MAC, ETH_P_IP),
        (OUR_MAC, ETH_P_ARP),
        (OUR_MAC, ETH_P_IP),
    ] or kinds == [(GUEST_MAC, ETH_P_ARP), (OUR_MAC, ETH_P_ARP), (GUEST_MAC, ETH_P_IP), (OUR_MAC, ETH_P_IP)]
    tcpdump = shutil.which("tcpdump")
    if tcpdump:
        out = subprocess.run([tcpdump, "-nr", str(pcap)], capture_output=True, text=True, timeout=20)
        assert "ARP, Reply" in out.stdout and "BOOTP/DHCP, Reply" in out.stdout, out.stdout + out.stderr
