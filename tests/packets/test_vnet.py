"""virtio-net headers for tap offloads, and segments whose TCP checksum the kernel completes."""

from __future__ import annotations

import struct

import pytest

from passtd.dataplane.packets.checksum import ones_sum
from passtd.dataplane.packets.tcp import ACK, SegmentBuilder, tcp_checksum_ok
from passtd.dataplane.packets.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, tcp_offload_header

A4, B4 = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))
A6, B6 = bytes(15) + b"\x01", bytes(15) + b"\x02"


def test_headers() -> None:
    assert struct.unpack("<BBHHHH", tcp_offload_header(False, 20, 1460)) == (
        F_NEEDS_CSUM, GSO_TCPV4, 14 + 20 + 20, 1460, 34, 16,
    )  # fmt: skip
    assert struct.unpack("<BBHHHH", tcp_offload_header(True, 32, 1440)) == (
        F_NEEDS_CSUM, GSO_TCPV6, 14 + 40 + 32, 1440, 54, 16,
    )  # fmt: skip
    assert struct.unpack("<BBHHHH", tcp_offload_header(False, 20, 0))[:2] == (F_NEEDS_CSUM, GSO_NONE)


@pytest.mark.parametrize(("src", "dst"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
@pytest.mark.parametrize("size", [0, 1, 1460, 64000])
def test_partial_checksum_completed_like_the_kernel(src: bytes, dst: bytes, size: int) -> None:
    data = bytes(i % 253 for i in range(size))
    packet = bytearray(SegmentBuilder(src, dst, 80, 4000, offload=True).build(1, 2, ACK, 3, data))
    hlen = 40 if len(src) == 16 else 20
    # The kernel (skb_checksum_help) sums from csum_start to the end, field included, stores the complement.
    total = ones_sum(packet[hlen:])
    struct.pack_into("!H", packet, hlen + 16, ~total & 0xFFFF)
    assert tcp_checksum_ok(src, dst, memoryview(packet)[hlen:])
