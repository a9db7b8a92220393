"""Host sockets, and the one place where their errors become log lines the user can act on."""

from __future__ import annotations

import _socket
import errno
import socket
import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from passtd.dataplane.core.context import is_loopback
from passtd.dataplane.core.flowtable import NamedSocket

_LINGER0: Final = struct.pack("ii", 1, 0)


def reset_socket(sock: _socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, and no TIME_WAIT is left behind."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()


def errno_name(code: int | None, unknown: str | None = None) -> str:
    """An errno as the reasons and log lines name it ("ECONNREFUSED"); `unknown` (else the number) for one
    that has no name."""
    name = errno.errorcode.get(code or 0)
    if name is not None:
        return name
    return str(code) if unknown is None else unknown


def local_name(sock: NamedSocket | None) -> tuple[str, int]:
    """A flow's host socket's local (host, port) as getsockname() says it; ("", 0) when there is no socket,
    it is closed, or it has no address. A system call: for the control views, not the per-frame path."""
    if sock is None:
        return "", 0
    try:
        name = sock.getsockname()
    except OSError:
        return "", 0
    if not isinstance(name, tuple) or len(name) < 2:
        return "", 0
    host, port = name[0], name[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return "", 0
    return host, port


def open_ping_socket(v6: bool) -> socket.socket:
    """An unprivileged ICMP echo socket; raises PermissionError when net.ipv4.ping_group_range forbids it."""
    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    return sock


def sockaddr(addr: bytes, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """Packed address → the tuple `sendto`/`connect` take for its family (inet_ntop: once per flow, and
    ipaddress's text form is interpreted code several times as slow)."""
    if len(addr) == 4:
        return (socket.inet_ntop(socket.AF_INET, addr), port)
    return (socket.inet_ntop(socket.AF_INET6, addr), port, 0, 0)


class Outbound:
    """--outbound: the source address for sockets toward the network, per family. Loopback targets keep
    the kernel's choice: traffic to the host itself is not outbound."""

    __slots__ = ("by_family",)

    def __init__(self, addresses: tuple[IPv4Address | IPv6Address, ...] = ()) -> None:
        self.by_family = {(socket.AF_INET6 if a.version == 6 else socket.AF_INET): str(a) for a in addresses}

    def source(self, target: bytes) -> str | None:
        """Address to bind before connecting to `target` (packed), or None for the kernel's choice."""
        if not self.by_family or is_loopback(target):
            return None
        return self.by_family.get(socket.AF_INET6 if len(target) == 16 else socket.AF_INET)


def ping_group_hint() -> str:
    """What to tell the user when ping sockets are refused."""
    try:
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            current = f.read().split()
    except OSError:
        current = []
    shown = " ".join(current) if current else "unknown"
    return (
        f"net.ipv4.ping_group_range is '{shown}'; allow this group with: "
        "sysctl -w net.ipv4.ping_group_range='0 2147483647'"
    )
