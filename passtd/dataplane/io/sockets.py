"""Host sockets, and the one place where their errors become log lines the user can act on."""

from __future__ import annotations

import _socket
import errno
import select
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from passtd.dataplane.core.context import Context, Guest, is_loopback
from passtd.dataplane.core.flowtable import NamedSocket

# linux/in.h and linux/in6.h; Python's socket module exports neither.
IP_FREEBIND: Final = 15
IPV6_FREEBIND: Final = 78

_LINGER0: Final = struct.pack("ii", 1, 0)


def accept_fd(listener: _socket.socket) -> tuple[int, tuple[str, int] | tuple[str, int, int, int]]:
    """accept4() without the socket object `socket.accept` builds around it: (descriptor, peer). The caller
    wraps the descriptor in the type it needs: `socket.socket.accept` reads the listener's `family` and `type`
    properties (interpreted code that builds enums) and runs the interpreted `socket.__init__` for every
    connection, which cost more than the accept itself on the spliced path."""
    return listener._accept()  # type: ignore[attr-defined,no-any-return]


class BacklogProbe:
    """Whether a listener still has a connection queued, asked with poll(0) before accepting again.

    Accepting until accept4() fails with EAGAIN costs an exception per batch, and in compiled code a
    traceback entry per frame it crosses: more instructions than the accept it ends, and a connection-rate
    test makes a batch of every connection. poll(0) costs the same one system call and no exception. One
    poll object, the descriptor registered only for the question (a dict entry, no system call)."""

    __slots__ = ("poll",)

    def __init__(self) -> None:
        self.poll = select.poll()

    def pending(self, fd: int) -> bool:
        poll = self.poll
        poll.register(fd, select.POLLIN)
        try:
            return bool(poll.poll(0))
        finally:
            poll.unregister(fd)


def reset_socket(sock: _socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, and no TIME_WAIT is left behind."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()


@dataclass(frozen=True, slots=True)
class HostSockets:
    """How the host-side sockets are made, from the options, handed to the dataplane as one value.

    `outbound`/`outbound_if4`/`outbound_if6`: source address and SO_BINDTODEVICE toward the network (never
    toward the host's loopback). `freebind`: forwarded-port listeners bind addresses the host does not
    have (yet). `splice`: pasta joins host-loopback connections to forwarded ports socket to socket inside
    the namespace (--no-splice: they cross the tap like any other). `host_lo_to_ns_lo`: such a spliced
    connection goes to the namespace's loopback; by default it goes to the namespace's own address, so a
    service bound to the namespace's 127.0.0.1 is not exposed by accident (passt fwd.c).
    """

    outbound: tuple[IPv4Address | IPv6Address, ...] = ()
    outbound_if4: str | None = None
    outbound_if6: str | None = None
    freebind: bool = False
    splice: bool = True
    host_lo_to_ns_lo: bool = False


def set_freebind(sock: socket.socket, family: int) -> None:
    """IP_FREEBIND / IPV6_FREEBIND (ip(7), ipv6(7)): bind() accepts an address not configured on the host."""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)


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


def open_ping_socket(v6: bool, outbound: Outbound | None = None, target: bytes = b"") -> socket.socket:
    """An unprivileged ICMP echo socket; raises PermissionError when net.ipv4.ping_group_range forbids it.
    With `outbound` and the flow's `target`, bound to the --outbound-if* interface and --outbound source
    like TCP and UDP sockets toward the network."""
    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    try:
        sock.setblocking(False)
        if outbound is not None and target:
            outbound.bind_device(sock, target)
            source = outbound.source(target)
            if source is not None:
                sock.bind((source, 0))
    except OSError:
        sock.close()
        raise
    return sock


def sockaddr(addr: bytes, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """Packed address → the tuple `sendto`/`connect` take for its family (inet_ntop: once per flow, and
    ipaddress's text form is interpreted code several times as slow)."""
    if len(addr) == 4:
        return (socket.inet_ntop(socket.AF_INET, addr), port)
    return (socket.inet_ntop(socket.AF_INET6, addr), port, 0, 0)


class Outbound:
    """--outbound / --outbound-if4 / --outbound-if6: the source address and the interface for sockets toward
    the network, per family. Loopback targets keep the kernel's choice: traffic to the host itself is not
    outbound."""

    __slots__ = ("by_family", "devices")

    def __init__(
        self,
        addresses: tuple[IPv4Address | IPv6Address, ...] = (),
        ifname4: str | None = None,
        ifname6: str | None = None,
    ) -> None:
        self.by_family = {(socket.AF_INET6 if a.version == 6 else socket.AF_INET): str(a) for a in addresses}
        self.devices: dict[int, bytes] = {}
        if ifname4:
            self.devices[socket.AF_INET] = ifname4.encode()
        if ifname6:
            self.devices[socket.AF_INET6] = ifname6.encode()

    def source(self, target: bytes) -> str | None:
        """Address to bind before connecting to `target` (packed), or None for the kernel's choice."""
        if not self.by_family or is_loopback(target):
            return None
        return self.by_family.get(socket.AF_INET6 if len(target) == 16 else socket.AF_INET)

    def device(self, target: bytes) -> bytes | None:
        """Interface name to bind to before connecting to `target` (packed), or None."""
        if not self.devices or is_loopback(target):
            return None
        return self.devices.get(socket.AF_INET6 if len(target) == 16 else socket.AF_INET)

    def bind_device(self, sock: _socket.socket, target: bytes) -> None:
        """SO_BINDTODEVICE toward `target` when an outbound interface is set; OSError if refused (EPERM
        without CAP_NET_RAW, ENODEV for a missing interface): the caller fails that flow."""
        dev = self.device(target)
        if dev is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev)


def splice_target_ns(ctx: Context, guest: Guest, v6: bool, to_loopback: bool) -> str:
    """Where pasta joins a host-loopback connection to a forwarded port inside the namespace (passt fwd.c
    fwd_nat_from_host): the namespace's loopback with --host-lo-to-ns-lo; by default the namespace's own
    address (the assigned one, or the one it was seen using), so services bound to its 127.0.0.1 stay
    private. With no address for the family, loopback is all there is."""
    loopback = "::1" if v6 else "127.0.0.1"
    if to_loopback:
        return loopback
    net = ctx.ip6 if v6 else ctx.ip4
    seen = sorted(a for a in (guest.addrs6 if v6 else guest.addrs4) if not a.is_link_local)
    if net is not None and (not seen or net.addr in seen):
        return str(net.addr)
    return str(seen[0]) if seen else loopback


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
