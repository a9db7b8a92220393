"""The virtio-net header before every frame on a tap with IFF_VNET_HDR (virtio spec §5.1.6, virtio_net_hdr).

It is how a tap passes offloads across: a frame we write may be one 64 KiB TCP "super-segment" that the
kernel hands to the guest as it would a GRO'd packet (gso_type/gso_size), with the TCP checksum left to the
kernel (NEEDS_CSUM + csum_start/csum_offset: the field holds only the pseudo-header sum). So neither the
segmentation into MSS-sized frames nor the checksum of the payload is done in Python. Fields are in the
host's byte order (little-endian on the machines we run on; the tap is never switched to big-endian).
"""

from __future__ import annotations

import struct
from typing import Final

VNET_HDR_LEN: Final = 10
F_NEEDS_CSUM: Final = 1
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4
ZERO_HDR: Final = bytes(VNET_HDR_LEN)
TCP_CSUM_OFFSET: Final = 16  # RFC 9293 §3.1: the checksum field within the TCP header
ETH_HLEN: Final = 14

_HDR = struct.Struct("<BBHHHH")


def tcp_offload_header(v6: bool, tcp_hlen: int, gso_size: int) -> bytes:
    """Header for a guest-bound TCP frame whose checksum field holds the pseudo-header sum.
    `gso_size` 0: a single segment; otherwise the kernel cuts the payload into segments of that size."""
    ip_hlen = 40 if v6 else 20
    start = ETH_HLEN + ip_hlen
    gso_type = (GSO_TCPV6 if v6 else GSO_TCPV4) if gso_size else GSO_NONE
    return _HDR.pack(F_NEEDS_CSUM, gso_type, start + tcp_hlen, gso_size, start, TCP_CSUM_OFFSET)
