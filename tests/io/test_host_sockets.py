"""Host-side socket options from the drop-in flags: --freebind on listeners, --no-tcp/--no-udp listener sets,
--outbound-if4/6 (SO_BINDTODEVICE), and where pasta splices host-loopback connections in the namespace.

Kernel-facing cases run in a private namespace (`pd-io-*`, deleted by the fixture) with documentation
addresses that no interface there has."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from passtd.dataplane.core.context import Context, Guest, Ip4Net, Ip6Net, link_local_from_mac
from passtd.dataplane.core.fwd import Listener
from passtd.dataplane.io.listeners import ListenerSet
from passtd.dataplane.io.netns import open_netns, run_in_netns
from passtd.dataplane.io.sockets import Outbound, open_ping_socket, splice_target_ns

NOWHERE4, NOWHERE6 = IPv4Address("192.0.2.99"), IPv6Address("2001:db8::99")


@pytest.fixture
def ns_fd(netns_name: str) -> Iterator[int]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    # With lo down the namespace has no local routing table yet, and IPv4 bind() takes any address.
    subprocess.run(["ip", "-n", netns_name, "link", "set", "lo", "up"], check=True, timeout=10)
    fd = open_netns(netns_name)
    try:
        yield fd
    finally:
        os.close(fd)


def listener_set(proto: str, fd: int, **kw: bool) -> tuple[asyncio.AbstractEventLoop, ListenerSet]:
    loop = asyncio.new_event_loop()
    factory = lambda family, kind: run_in_netns(fd, socket.socket, family, kind)  # noqa: E731
    return loop, ListenerSet(proto, loop, lambda lst, s: None, socket_factory=factory, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_freebind_binds_an_address_the_host_does_not_have(ns_fd: int, proto: str) -> None:
    wanted = [Listener(NOWHERE4, None, 20001, 20001), Listener(NOWHERE6, None, 20002, 20002)]
    loop, plain = listener_set(proto, ns_fd)
    try:
        results = plain.apply(wanted)
        assert [(r.ok, r.errno_name) for r in results] == [(False, "EADDRNOTAVAIL")] * 2
        assert len(plain) == 0
    finally:
        plain.close()
        loop.close()
    loop, free = listener_set(proto, ns_fd, freebind=True)
    try:
        results = free.apply(wanted)
        assert [(r.ok, r.address) for r in results] == [(True, str(NOWHERE4)), (True, str(NOWHERE6))]
        socks = free.sockets(wanted[0])
        assert socks[str(NOWHERE4)].getsockname() == (str(NOWHERE4), 20001)
    finally:
        free.close()
        loop.close()


def test_disabled_set_opens_nothing(ns_fd: int) -> None:
    """--no-tcp / --no-udp: no forwarding listener of that protocol, whatever the policy says."""
    loop, off = listener_set("tcp", ns_fd, enabled=False)
    try:
        assert off.apply([Listener(None, None, 20003, 20003)]) == []
        assert len(off) == 0 and off.listeners == frozenset()
    finally:
        off.close()
        loop.close()


def test_outbound_interface_per_family_and_never_for_loopback(ns_fd: int) -> None:
    out = Outbound((), "lo", None)
    assert out.device(IPv4Address("203.0.113.1").packed) == b"lo"
    assert out.device(IPv6Address("2001:db8::1").packed) is None  # no --outbound-if6
    assert out.device(IPv4Address("127.0.0.1").packed) is None  # the host itself is not outbound
    sock = run_in_netns(ns_fd, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
    try:
        out.bind_device(sock, IPv4Address("203.0.113.1").packed)
        bound = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")
        assert bound == b"lo"
    finally:
        sock.close()
    missing = Outbound((), None, "nosuchif0")
    sock6 = run_in_netns(ns_fd, socket.socket, socket.AF_INET6, socket.SOCK_STREAM)
    try:
        with pytest.raises(OSError) as exc:
            missing.bind_device(sock6, IPv6Address("2001:db8::1").packed)
        assert exc.value.errno == errno.ENODEV
    finally:
        sock6.close()


def test_splice_target_in_the_namespace() -> None:
    """--host-lo-to-ns-lo: the namespace's loopback; by default its address (assigned, or the one seen)."""
    mac = bytes.fromhex("9a559a559a55")
    ctx = Context(
        ip4=Ip4Net(IPv4Address("192.0.2.10"), 24, IPv4Address("192.0.2.1")),
        ip6=Ip6Net(IPv6Address("2001:db8::10"), 64, IPv6Address("2001:db8::1"), link_local_from_mac(mac)),
    )
    guest = Guest()
    assert splice_target_ns(ctx, guest, False, True) == "127.0.0.1"
    assert splice_target_ns(ctx, guest, True, True) == "::1"
    assert splice_target_ns(ctx, guest, False, False) == "192.0.2.10"
    assert splice_target_ns(ctx, guest, True, False) == "2001:db8::10"
    guest.addrs4.add(IPv4Address("192.0.2.77"))  # the guest took another address than the one we assigned
    guest.addrs6.add(IPv6Address("fe80::1"))  # link-local ones do not count
    assert splice_target_ns(ctx, guest, False, False) == "192.0.2.77"
    assert splice_target_ns(ctx, guest, True, False) == "2001:db8::10"
    guest.addrs4.add(IPv4Address("192.0.2.10"))
    assert splice_target_ns(ctx, guest, False, False) == "192.0.2.10"
    assert splice_target_ns(Context(), Guest(), False, False) == "127.0.0.1"  # no address: loopback


def test_ping_socket_follows_outbound_interface_and_source(ns_fd: int, netns_name: str) -> None:
    """ICMP echo toward the network leaves like TCP and UDP: --outbound-if4 and --outbound apply, not for
    the host's loopback."""
    subprocess.run(["ip", "netns", "exec", netns_name, "sysctl", "-qw", "net.ipv4.ping_group_range=0 0"],
                   check=True, timeout=10)  # fmt: skip
    subprocess.run(
        ["ip", "-n", netns_name, "addr", "add", "192.0.2.5/24", "dev", "lo"], check=True, timeout=10
    )
    out = Outbound((IPv4Address("192.0.2.5"),), "lo", None)
    sock = run_in_netns(ns_fd, open_ping_socket, False, out, IPv4Address("203.0.113.1").packed)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0") == b"lo"
        assert sock.getsockname()[0] == "192.0.2.5"
    finally:
        sock.close()
    local = run_in_netns(ns_fd, open_ping_socket, False, out, IPv4Address("127.0.0.1").packed)
    try:
        assert local.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0") == b""
        assert local.getsockname()[0] == "0.0.0.0"
    finally:
        local.close()
    with pytest.raises(OSError) as exc:
        run_in_netns(
            ns_fd, open_ping_socket, False, Outbound((), "nosuchif0"), IPv4Address("203.0.113.1").packed
        )
    assert exc.value.errno == errno.ENODEV
