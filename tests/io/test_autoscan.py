"""Reading bound ports from /proc/net tables, for pasta's `auto` forwarding."""

from __future__ import annotations

import socket

from passtd.dataplane.io.autoscan import parse_bound_ports, read_bound_ports

TCP_TABLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 563 1 0 100 0 0
   1: 0100007F:9F0E 0100007F:543E 01 00000000:00000000 03:0000110B 00000000     0        0 0 3 0
   2: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 9 1 0 100 0 0 10 0
   3: garbage
"""


def test_parse_listening_ports_only() -> None:
    assert parse_bound_ports(TCP_TABLE, "0A") == {0x07E8, 0x1F90}
    assert parse_bound_ports(TCP_TABLE, "01") == {0x9F0E}
    assert parse_bound_ports("", "0A") == set()


def test_read_finds_our_own_listener_and_udp_socket() -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind(("::1", 0))
    try:
        assert tcp.getsockname()[1] in read_bound_ports("tcp")
        assert udp.getsockname()[1] in read_bound_ports("udp")
        assert tcp.getsockname()[1] not in read_bound_ports("udp")
    finally:
        tcp.close()
        udp.close()
