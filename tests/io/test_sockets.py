"""The io layer's one home for socket names, errno names and the abortive close, on real loopback sockets."""

from __future__ import annotations

import errno
import socket

from passtd.dataplane.core.flowtable import V4_MAPPED, Flow, key_addr, unmap
from passtd.dataplane.core.icmp import EchoFlow
from passtd.dataplane.core.splice import SpliceFlow
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.udp import UdpFlow
from passtd.dataplane.io.sockets import errno_name, local_name, reset_socket


def test_local_name_of_a_bound_socket_and_of_none() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert local_name(sock) == ("127.0.0.1", port)
    finally:
        sock.close()
    assert local_name(sock) == ("", 0)  # closed: no name, no exception
    assert local_name(None) == ("", 0)


def test_flows_hand_their_host_socket_to_the_views() -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.bind(("::1", 0))
        flow = UdpFlow(1, 17, (17, b"", 0, 0), 0.0, 0.0, sock=sock)
        assert local_name(flow.host_socket()) == ("::1", sock.getsockname()[1])
    finally:
        sock.close()
    for other in (
        TcpConn(2, 6, (6, b"", 0, 0), 0.0, 0.0),
        EchoFlow(3, 1, (1, b"", 0, 0), 0.0, 0.0),
        SpliceFlow(4, 6, (6, b"", 0, 0), 0.0, 0.0),
    ):
        assert other.host_socket() is None


def test_every_flow_describes_its_sides_with_the_base_fields() -> None:
    """The sides are declared once, on Flow: a protocol that redeclares them would shadow the base's."""
    sides = {"guest_addr", "guest_port", "remote_addr", "remote_port", "target_addr"}
    assert sides <= set(Flow.__dataclass_fields__)
    for cls in (TcpConn, UdpFlow, EchoFlow, SpliceFlow):
        assert not sides & set(vars(cls).get("__slots__", ())), cls


def test_errno_names() -> None:
    assert errno_name(errno.ECONNREFUSED) == "ECONNREFUSED"
    assert errno_name(99999) == "99999"
    assert errno_name(0, "EHUP") == "EHUP"
    assert errno_name(None) == "None"


def test_v4_mapped_has_one_spelling() -> None:
    v4 = bytes((192, 0, 2, 1))
    assert key_addr(v4) == V4_MAPPED + v4
    assert unmap(key_addr(v4)) == v4
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert unmap(v6) == v6 and unmap(v4) == v4


def test_reset_socket_sends_rst() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(5)
        client.settimeout(5)
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        reset_socket(accepted)
        try:
            data = client.recv(1)
        except ConnectionResetError:
            data = None
        assert data is None  # an orderly close would have read b""
    finally:
        client.close()
        server.close()
