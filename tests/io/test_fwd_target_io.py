"""A forwarded UDP port whose rule names a target address: the datagrams reach the guest at that address."""

from __future__ import annotations

import socket
import time
from ipaddress import IPv4Address

import dpkt

from passtd.dataplane.core.fwd import Listener
from tests.helpers.tcpfake import GW4
from tests.io.test_udp_io import LOOP4, Harness, harness, receiver

__all__ = ["harness"]  # the fixture, shared with test_udp_io

TARGET = IPv4Address("10.0.2.99")


def test_datagrams_go_to_the_rules_target_address(harness: Harness) -> None:
    h = harness
    lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    lsock.bind((LOOP4, 0))
    lport = lsock.getsockname()[1]
    peer = receiver()
    try:
        peer.sendto(b"to the target", (LOOP4, lport))
        time.sleep(0.05)
        h.relay.on_listener(Listener(IPv4Address(LOOP4), None, lport, 5353, TARGET), lsock)
        ((_, packet),) = h.frames
        ip = dpkt.ip.IP(packet)
        assert (ip.src, ip.dst, ip.data.dport, ip.data.data) == (GW4, TARGET.packed, 5353, b"to the target")
        (flow,) = h.relay.active.values()
        assert flow.guest_addr == TARGET.packed
    finally:
        peer.close()
        lsock.close()
