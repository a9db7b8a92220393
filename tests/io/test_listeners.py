"""ListenerSet against the real kernel: loopback only (127.0.0.1, ::1), plus one test in a private netns.

Ports are random high ports checked free on both loopbacks; conflicts are made by binding the port ourselves
first. EACCES (ports < 1024) cannot be provoked as root, so it is not tested here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeVar

import pytest
import uvloop

from passtd.dataplane.core.fwd import Listener, diff, parse_spec
from passtd.dataplane.core.limits import FdPool
from passtd.dataplane.io.listeners import BindResult, ListenerSet

T = TypeVar("T")
L4 = IPv4Address("127.0.0.1")
L6 = IPv6Address("::1")


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await asyncio.wait_for(main(), timeout=20)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(wrapper())


def free_ports(count: int) -> list[int]:
    """Random high ports (below the ephemeral range) currently free for TCP and UDP on both loopbacks."""
    found: list[int] = []
    for _ in range(500):
        port = 20000 + secrets.randbelow(12000)
        if port in found:
            continue
        try:
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(family, kind) as probe:
                        probe.bind((host, port))
        except OSError:
            continue
        found.append(port)
        if len(found) == count:
            return found
    raise AssertionError("no free ports found")


def tcp_accepts(host: str, port: int) -> bool:
    """Whether a blocking connect() to host:port succeeds (the kernel completes it from the backlog)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        try:
            client.connect((host, port))
        except ConnectionRefusedError:
            return False
        return True


async def wait_until(pred: Callable[[], bool], what: str) -> None:
    """Poll `pred` while the loop runs (callbacks fire), for at most 3 s."""
    for _ in range(300):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Accepting:
    """on_readable for TCP: accept and remember (listener, connection)."""

    def __init__(self) -> None:
        self.accepted: list[tuple[Listener, socket.socket]] = []

    def __call__(self, listener: Listener, sock: socket.socket) -> None:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return
        self.accepted.append((listener, conn))

    def close(self) -> None:
        for _, conn in self.accepted:
            conn.close()


def by_port(results: list[BindResult]) -> dict[tuple[int, str], BindResult]:
    return {(r.listener.port, r.address): r for r in results}


def test_apply_diff_opens_closes_and_retargets() -> None:
    p1, p2, p3 = free_ports(3)
    acc = Accepting()

    async def main() -> None:
        ls = ListenerSet("tcp", asyncio.get_running_loop(), acc)
        try:
            old = parse_spec(f"127.0.0.1/{p1},{p2} ::1/{p2}")
            results = ls.apply_diff(*diff(parse_spec("none"), old))
            assert all(r.ok for r in results), results
            assert {(r.listener.port, r.address) for r in results} == {
                (p1, "127.0.0.1"),
                (p2, "127.0.0.1"),
                (p2, "::1"),
            }
            assert len(ls) == 3 and ls.listeners == frozenset(old.listeners())
            first_sock = ls.sockets(Listener(L4, None, p1, p1))["127.0.0.1"]

            assert tcp_accepts("127.0.0.1", p1) and tcp_accepts("::1", p2)
            await wait_until(lambda: len(acc.accepted) == 2, "two accepts")
            assert {(lst.port, lst.target_port) for lst, _ in acc.accepted} == {(p1, p1), (p2, p2)}

            # p1 retargeted, p2 removed from both families, p3 added.
            new = parse_spec(f"127.0.0.1/{p1}:9999,{p3}")
            to_close, to_open = diff(old, new)
            results = ls.apply_diff(to_close, to_open)
            assert all(r.ok for r in results), results
            assert by_port(results)[(p1, "127.0.0.1")].message.endswith(": kept")
            assert ls.sockets(Listener(L4, None, p1, 9999))["127.0.0.1"] is first_sock  # same socket
            assert ls.listeners == frozenset(new.listeners())

            assert not tcp_accepts("127.0.0.1", p2)
            assert not tcp_accepts("::1", p2)
            assert tcp_accepts("127.0.0.1", p3)
            assert tcp_accepts("127.0.0.1", p1)
            await wait_until(lambda: len(acc.accepted) == 4, "two more accepts")
            assert {(lst.port, lst.target_port) for lst, _ in acc.accepted[2:]} == {(p1, 9999), (p3, p3)}
        finally:
            ls.close()
            acc.close()
        assert len(ls) == 0 and not ls.listeners
        assert not tcp_accepts("127.0.0.1", p1) and not tcp_accepts("127.0.0.1", p3)

    run(main)


def test_apply_converges_to_a_set() -> None:
    p1, p2 = free_ports(2)
    acc = Accepting()

    async def main() -> None:
        ls = ListenerSet("tcp", asyncio.get_running_loop(), acc)
        try:
            assert all(r.ok for r in ls.apply({Listener(L4, None, p1, p1), Listener(L6, None, p2, p2)}))
            assert all(r.ok for r in ls.apply({Listener(L6, None, p2, p2)}))
            assert ls.listeners == {Listener(L6, None, p2, p2)}
            assert not tcp_accepts("127.0.0.1", p1) and tcp_accepts("::1", p2)
            assert ls.apply({Listener(L6, None, p2, p2)}) == []  # nothing to do
        finally:
            ls.close()
            acc.close()

    run(main)


def test_bind_conflicts_are_reported_per_port() -> None:
    busy, fine = free_ports(2)
    acc = Accepting()

    async def main() -> None:
        squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        squatter.bind(("127.0.0.1", busy))
        squatter.listen(1)
        ls = ListenerSet("tcp", asyncio.get_running_loop(), acc)
        try:
            results = by_port(
                ls.apply(
                    {
                        Listener(L4, None, busy, busy),
                        Listener(L4, None, fine, fine),
                        Listener(IPv4Address("192.0.2.1"), None, fine, fine),  # not a local address
                        Listener(L4, "pd-nodev0", fine + 1, fine + 1),  # no such interface
                    }
                )
            )
            bad = results[(busy, "127.0.0.1")]
            assert not bad.ok and bad.errno_name == "EADDRINUSE"
            assert (
                bad.message == f"tcp 127.0.0.1:{busy}: Address already in use (another socket is bound to it)"
            )
            assert results[(fine, "127.0.0.1")].ok
            notavail = results[(fine, "192.0.2.1")]
            assert not notavail.ok and notavail.errno_name == "EADDRNOTAVAIL"
            nodev = results[(fine + 1, "127.0.0.1")]
            assert not nodev.ok and nodev.errno_name == "ENODEV"
            assert "pd-nodev0" in nodev.message
            # Only the bound one is held; a failed one is retried by the next apply of the same set.
            assert ls.listeners == {Listener(L4, None, fine, fine)}
            squatter.close()
            again = ls.apply({Listener(L4, None, busy, busy), Listener(L4, None, fine, fine)})
            assert [(r.listener.port, r.ok) for r in again] == [(busy, True)]
            assert tcp_accepts("127.0.0.1", busy)
        finally:
            squatter.close()
            ls.close()
            acc.close()

    run(main)


def test_udp_listener_delivers_datagrams_and_reports_conflicts() -> None:
    port, busy = free_ports(2)
    got: list[tuple[Listener, bytes]] = []

    def on_readable(listener: Listener, sock: socket.socket) -> None:
        try:
            data, _ = sock.recvfrom(2048)
        except BlockingIOError:
            return
        got.append((listener, data))

    async def main() -> None:
        squatter = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        squatter.bind(("::1", busy))
        ls = ListenerSet("udp", asyncio.get_running_loop(), on_readable)
        try:
            results = by_port(ls.apply({Listener(L4, None, port, 5353), Listener(L6, None, busy, busy)}))
            assert results[(port, "127.0.0.1")].ok
            assert results[(busy, "::1")].errno_name == "EADDRINUSE"
            sock = ls.sockets(Listener(L4, None, port, 5353))["127.0.0.1"]
            assert sock.type == socket.SOCK_DGRAM and not sock.getblocking()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.sendto(b"hello", ("127.0.0.1", port))
                await wait_until(lambda: bool(got), "a datagram")
            assert got == [(Listener(L4, None, port, 5353), b"hello")]
        finally:
            squatter.close()
            ls.close()

    run(main)


def test_closing_a_listener_leaves_accepted_connections_alone() -> None:
    (port,) = free_ports(1)
    acc = Accepting()

    async def main() -> None:
        ls = ListenerSet("tcp", asyncio.get_running_loop(), acc)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            ls.apply({Listener(L4, None, port, port)})
            client.settimeout(2)
            client.connect(("127.0.0.1", port))
            await wait_until(lambda: bool(acc.accepted), "the accept")
            ls.apply(set())
            assert not tcp_accepts("127.0.0.1", port)
            _, conn = acc.accepted[0]
            conn.setblocking(True)
            conn.settimeout(2)
            client.sendall(b"ping")
            assert conn.recv(16) == b"ping"
            conn.sendall(b"pong")
            assert client.recv(16) == b"pong"
        finally:
            client.close()
            ls.close()
            acc.close()

    run(main)


def test_bind_to_device_and_socket_options() -> None:
    (port,) = free_ports(1)
    acc = Accepting()

    async def main() -> None:
        ls = ListenerSet("tcp", asyncio.get_running_loop(), acc)
        try:
            lst = Listener(L6, "lo", port, port)
            (result,) = ls.apply({lst})
            if not result.ok and result.errno_name == "EPERM":
                pytest.skip("SO_BINDTODEVICE not permitted here")
            assert result.ok, result
            sock = ls.sockets(lst)["::1"]
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0") == b"lo"
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            assert not sock.getblocking()
            assert tcp_accepts("::1", port)
        finally:
            ls.close()
            acc.close()

    run(main)


# --- the wildcard (both families) path, only inside a namespace this test creates -------------------------


@pytest.fixture
def private_netns() -> Iterator[int]:
    """A fresh namespace with only `lo` up; yields an open descriptor of it, deleted afterwards."""
    from passtd.dataplane.io.netns import open_netns

    name = f"pd-lst-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    fd = -1
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        fd = open_netns(name)
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def _in_ns(fd: int, fn: Callable[..., T], *args: Any) -> T:
    from passtd.dataplane.io.netns import run_in_netns

    return run_in_netns(fd, fn, *args)


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a network namespace")
@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed")
def test_wildcard_listener_binds_both_families_in_a_namespace(private_netns: int) -> None:
    fd = private_netns
    port = 20000 + secrets.randbelow(12000)  # the namespace is empty: any port is free
    acc = Accepting()

    def factory(family: int, kind: int) -> socket.socket:
        return _in_ns(fd, socket.socket, family, kind)

    def connects(host: str) -> bool:
        return _in_ns(fd, tcp_accepts, host, port)

    async def main() -> None:
        ls = ListenerSet("tcp", asyncio.get_running_loop(), acc, socket_factory=factory)
        try:
            results = ls.apply({Listener(None, None, port, 8080)})
            assert [(r.address, r.ok) for r in results] == [("0.0.0.0", True), ("::", True)]
            socks = ls.sockets(Listener(None, None, port, 8080))
            assert socks["::"].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            assert connects("127.0.0.1") and connects("::1")
            await wait_until(lambda: len(acc.accepted) == 2, "accepts on both families")
            families = {conn.family for _, conn in acc.accepted}
            assert families == {socket.AF_INET, socket.AF_INET6}
            assert {lst.target_port for lst, _ in acc.accepted} == {8080}
            ls.apply(set())
            assert not connects("127.0.0.1") and not connects("::1")
        finally:
            ls.close()
            acc.close()

    run(main)


def test_the_listener_budget_stops_binding_and_reports_each_port_past_it() -> None:
    """`-t all` on a small descriptor pool: the first ports bind, every later one is reported, nothing reaches
    EMFILE; closing gives the room back, and what flows hold is not taken."""
    ports = free_ports(6)

    async def main() -> None:
        pool = FdPool(open_files=100, reserved=10, total=6, floor=2)
        tcp = ListenerSet("tcp", asyncio.get_running_loop(), Accepting(), pool=pool)
        udp = ListenerSet("udp", asyncio.get_running_loop(), lambda lst, s: None, pool=pool)
        try:
            results = tcp.apply({Listener(L4, None, p, p) for p in ports[:3]})
            assert [r.ok for r in results] == [True, True, True]
            results = udp.apply({Listener(L4, None, p, p) for p in ports[3:]})
            refused = (False, "EMFILE")
            assert [(r.ok, r.errno_name) for r in results] == [(True, None), refused, refused]
            assert "listener limit reached (4 open" in results[1].message
            assert pool.listeners == 4 == len(tcp) + len(udp)
            tcp.apply(set())
            assert pool.listeners == 1
            pool.flows = 4  # flows now hold more than the floor: listeners leave them that
            results = udp.apply({Listener(L4, None, p, p) for p in ports[3:]})  # the two not bound yet
            assert [r.ok for r in results] == [True, False] and pool.listeners == 2
        finally:
            tcp.close()
            udp.close()
        assert pool.listeners == 0

    run(main)


def test_apply_async_binds_in_slices_with_the_loop_running_between() -> None:
    ports = free_ports(12)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ticks = 0
        running = True

        def tick() -> None:
            nonlocal ticks
            ticks += 1
            if running:
                loop.call_soon(tick)

        lset = ListenerSet("udp", loop, lambda lst, s: None)
        try:
            loop.call_soon(tick)
            results = await lset.apply_async({Listener(L4, None, p, p) for p in ports}, slice_size=2)
            running = False
            assert len(results) == 12 and all(r.ok for r in results)
            assert ticks >= 5  # other callbacks ran between the six slices
        finally:
            lset.close()

    run(main)


def test_one_change_shares_the_listener_room_fairly_between_protocols() -> None:
    """`-t all -u all` under a small descriptor limit: TCP's range is planned first, yet UDP gets its equal
    part of the room instead of nothing (the pure split is tested in tests/core/test_limits.py)."""
    from passtd.dataplane.core.fwd import ForwardTables
    from passtd.dataplane.io.forwarding import Forwarding

    ports = free_ports(8)
    spec = "127.0.0.1/" + ",".join(str(p) for p in ports)

    async def main() -> None:
        pool = FdPool(open_files=100, reserved=10, total=7, floor=1)  # room for 6 listeners
        fwd = Forwarding(asyncio.get_running_loop(), pool, Accepting(), lambda lst, s: None,
                         Accepting(), lambda lst, s: None)  # fmt: skip
        try:
            results = fwd.apply(ForwardTables.from_options(spec, spec, None, None, "passt"))
            assert (len(fwd.tcp), len(fwd.udp)) == (3, 3)
            refused = [r for r in results if not r.ok]
            assert len(refused) == 10 and {r.errno_name for r in refused} == {"EMFILE"}
            assert "3 of them udp's share" in next(r.message for r in refused if r.listener.port in ports
                                                     and r.message.startswith("udp"))  # fmt: skip
            assert fwd.tcp.cap is None and fwd.udp.cap is None  # the caps hold for one change only
            # A change that fits takes what it asks: UDP alone, with TCP's three sockets given back.
            results = fwd.apply(ForwardTables.from_options("none", spec, None, None, "passt"))
            assert (len(fwd.tcp), len(fwd.udp)) == (0, 6) and pool.listeners == 6
        finally:
            fwd.close()
        assert pool.listeners == 0

    run(main)
