"""Forwarding transactions against the real kernel, on 127.0.0.1 only (plus one test in a private netns).

A port is made unavailable by binding it ourselves first. "Exactly as before" is checked on the socket
objects (the same descriptors stay open and served), the tables, the rule ids, and the kernel's view (a
connect to a port this transaction wanted is refused).
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from passtd.dataplane.core.fwd import Listener
from passtd.dataplane.core.limits import FdPool
from passtd.dataplane.io.forwarding import Forwarding
from passtd.dataplane.io.listeners import ListenerSet
from passtd.errors import ConfigError
from tests.io.test_listeners import (
    Accepting,
    _in_ns,
    free_ports,
    private_netns,  # noqa: F401  (a fixture)
    run,
    tcp_accepts,
    wait_until,
)

L4 = IPv4Address("127.0.0.1")


def forwarding(acc: Accepting) -> Forwarding:
    loop = asyncio.get_running_loop()
    return Forwarding(loop, FdPool(0, 0, 1 << 30, 0), acc, acc, acc, acc)


def spec(*ports: int) -> str:
    return "127.0.0.1/" + ",".join(map(str, ports))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def squatter() -> Iterator[tuple[socket.socket, int]]:
    """A port of ours, bound and listening on 127.0.0.1, so that passtd's bind of it fails."""
    (port,) = free_ports(1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    try:
        yield sock, port
    finally:
        sock.close()


def test_a_taken_port_leaves_tables_ids_and_sockets_exactly_as_before(
    squatter: tuple[socket.socket, int],
) -> None:
    _, taken = squatter
    p1, p2, p3 = free_ports(3)
    acc = Accepting()

    async def main() -> None:
        fwd = forwarding(acc)
        try:
            tx = await fwd.transact_async(lambda t: t.replace("tcp_in", spec(p1, p2)))
            assert tx.committed and tx.added == (1, 2)
            ids = {e.rule.first: e.id for e in fwd.book.of("tcp_in") if e.rule}
            tables, book = fwd.tables, fwd.book
            kept = {lst.port: fwd.tcp.sockets(lst)["127.0.0.1"] for lst in fwd.tcp.listeners}
            fds = open_fds()
            # p1 stays, p2 goes, p3 and `taken` come: `taken` fails, so none of it happens.
            tx = await fwd.transact_async(lambda t: t.replace("tcp_in", spec(p1, p3, taken)))
            assert not tx.committed
            assert [(r.listener.port, r.errno_name) for r in tx.fatal] == [(taken, "EADDRINUSE")]
            assert f"127.0.0.1:{taken}" in tx.fatal[0].message
            assert tx.removed == (ids[p2],) and len(tx.added) == 2  # what it would have done
            assert fwd.tables is tables and fwd.book is book
            assert {lst.port: fwd.tcp.sockets(lst)["127.0.0.1"] for lst in fwd.tcp.listeners} == kept
            assert open_fds() == fds and len(fwd) == 2
            assert tcp_accepts("127.0.0.1", p1) and tcp_accepts("127.0.0.1", p2)
            assert not tcp_accepts("127.0.0.1", p3)
            await wait_until(lambda: len(acc.accepted) == 2, "p1 and p2 still served")
            # Without the taken port it commits: p2's socket closes, p3's opens, p1's is the same.
            tx = await fwd.transact_async(lambda t: t.replace("tcp_in", spec(p1, p3)))
            assert tx.committed and tx.removed == (ids[p2],)
            assert fwd.tcp.sockets(Listener(L4, None, p1, p1))["127.0.0.1"] is kept[p1]
            assert tcp_accepts("127.0.0.1", p3) and not tcp_accepts("127.0.0.1", p2)
        finally:
            fwd.close()
            acc.close()

    run(main)


def test_dry_run_binds_nothing_and_reports_the_taken_port(squatter: tuple[socket.socket, int]) -> None:
    _, taken = squatter
    p1, p2 = free_ports(2)
    acc = Accepting()

    async def main() -> None:
        fwd = forwarding(acc)
        try:
            await fwd.transact_async(lambda t: t.replace("tcp_in", spec(p1)))
            tables, fds = fwd.tables, open_fds()
            tx = await fwd.transact_async(lambda t: t.add("tcp_in", spec(p2, taken)), dry_run=True)
            assert not tx.committed and tx.dry_run
            assert [(r.listener.port, r.errno_name) for r in tx.fatal] == [(taken, "EADDRINUSE")]
            assert [r.message for r in tx.results if r.ok and r.listener.port == p2] == [
                f"tcp 127.0.0.1:{p2}: free"
            ]
            assert fwd.tables is tables and open_fds() == fds and not tcp_accepts("127.0.0.1", p2)
            tx = await fwd.transact_async(lambda t: t.add("tcp_in", spec(p2)), dry_run=True)
            assert not tx.fatal and not tx.committed and tx.tables.tcp_in.to_spec() == spec(*sorted((p1, p2)))
            assert fwd.tables is tables and open_fds() == fds and not tcp_accepts("127.0.0.1", p2)
            # A bad change raises before any bind, under the same lock.
            with pytest.raises(ConfigError):
                await fwd.transact_async(lambda t: t.add("tcp_in", spec(p1)))
            assert fwd.tables is tables and not fwd.lock.locked()
        finally:
            fwd.close()
            acc.close()

    run(main)


def test_more_than_255_rules_in_one_transaction() -> None:
    ports = free_ports(300)
    acc = Accepting()

    async def main() -> None:
        fwd = forwarding(acc)
        try:
            for port in ports:  # one rule each: 300 ids
                tx = await fwd.transact_async(lambda t, p=port: t.add("tcp_in", spec(p)))  # type: ignore[misc]
                assert tx.committed
            assert len(fwd.book.of("tcp_in")) == 300 and len(fwd) == 300 == len(
                fwd.tcp
            )  # the set counts commits
            assert tcp_accepts("127.0.0.1", ports[-1])
            ids = [e.id for e in fwd.book.of("tcp_in")][:256]
            tx = await fwd.transact_async(lambda t: fwd.book.without(t, ids))
            assert tx.committed and len(tx.removed) == 256 and len(fwd) == 44 == len(fwd.tcp)
        finally:
            fwd.close()
            acc.close()

    run(main)


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a network namespace")
@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed")
def test_moving_a_port_to_the_wildcard_address_and_back(private_netns: int) -> None:  # noqa: F811
    """127.0.0.1:P → 0.0.0.0:P cannot bind while the old socket listens: the stage closes it first; an
    abort binds it again."""
    fd = private_netns
    port = 20000 + secrets.randbelow(12000)
    acc = Accepting()

    def factory(family: int, kind: int) -> socket.socket:
        return _in_ns(fd, socket.socket, family, kind)

    async def main() -> None:
        ls = ListenerSet("tcp", asyncio.get_running_loop(), acc, socket_factory=factory)
        old = Listener(L4, None, port, port)
        new = Listener(IPv4Address("0.0.0.0"), None, port, port)
        try:
            assert all(r.ok for r in ls.apply({old}))
            dry = ls.stage({new}, dry_run=True)
            assert [r.message for r in dry.results] == [
                f"tcp 0.0.0.0:{port}: free once tcp 127.0.0.1:{port} closes"
            ]
            ls.abort(dry)
            assert ls.listeners == {old}
            stage = ls.stage({new})
            assert all(r.ok for r in stage.results) and old.key in stage.displaced
            assert ls.abort(stage) == []  # bound again
            assert ls.listeners == {old} and _in_ns(fd, tcp_accepts, "127.0.0.1", port)
            await wait_until(lambda: len(acc.accepted) == 1, "the connection to the bound-again socket")
            stage = ls.stage({new})
            ls.commit(stage)
            assert ls.listeners == {new} and _in_ns(fd, tcp_accepts, "127.0.0.1", port)
            await wait_until(lambda: len(acc.accepted) == 2, "both connections accepted")
        finally:
            ls.close()
            acc.close()

    run(main)


def test_rules_tally_what_comes_in() -> None:
    """A connection accepted on a rule's port reaches the callback with that rule's id and tally."""
    p1, p2 = free_ports(2)
    acc = Accepting()

    async def main() -> None:
        fwd = forwarding(acc)
        try:
            await fwd.transact_async(lambda t: t.replace("tcp_in", spec(p1)))
            await fwd.transact_async(lambda t: t.add("tcp_in", spec(p2)))
            assert tcp_accepts("127.0.0.1", p2)
            await wait_until(lambda: len(acc.accepted) == 1, "the connection on p2")
            listener, _ = acc.accepted[0]
            assert listener.rule == 2 and listener.tally is fwd.tally(2)
            # The rule of p1 goes: its counters go with it, p2's stay.
            await fwd.transact_async(lambda t: fwd.book.without(t, [1]))
            assert fwd.tally(1) is None and fwd.tally(2) is listener.tally
        finally:
            fwd.close()
            acc.close()

    run(main)


def test_a_reload_during_a_transaction_waits_for_it() -> None:
    """SIGHUP's `apply` while a transaction holds the lock runs after it, not beside its staged sockets."""
    (p1,) = free_ports(1)
    acc = Accepting()

    async def main() -> None:
        fwd = forwarding(acc)
        try:
            async with fwd.lock:
                assert fwd.apply(fwd.tables.replace("tcp_in", spec(p1))) == []
                assert fwd.tables.tcp_in.mode == "none" and len(fwd) == 0
            await wait_until(lambda: fwd.tables.tcp_in.mode == "spec", "the reload after the lock")
            assert len(fwd) == 1 and fwd.book.of("tcp_in")[0].rule is not None
            assert tcp_accepts("127.0.0.1", p1)
        finally:
            fwd.close()
            acc.close()

    run(main)


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a network namespace")
@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed")
def test_which_failed_binds_undo_a_transaction(private_netns: int) -> None:  # noqa: F811
    """A missing family of an address-less rule does not (as at start-up), a `tolerate`d bind does not,
    anything else does."""
    fd = private_netns
    port, taken = 20000 + secrets.randbelow(6000), 26000 + secrets.randbelow(6000)
    acc = Accepting()

    def no_ipv6(family: int, kind: int) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return _in_ns(fd, socket.socket, family, kind)

    def squat() -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.1", taken))
        sock.listen()
        return sock

    async def main() -> None:
        fwd = forwarding(acc)
        fwd.tcp.close()
        fwd.tcp = ListenerSet("tcp", asyncio.get_running_loop(), acc, socket_factory=no_ipv6)
        squatter = _in_ns(fd, squat)
        try:
            tx = await fwd.transact_async(lambda t: t.replace("tcp_in", str(port)))
            assert tx.committed and [(r.address, r.errno_name) for r in tx.results if not r.ok] == [
                ("::", "EAFNOSUPPORT")
            ]
            assert _in_ns(fd, tcp_accepts, "127.0.0.1", port)
            tx = await fwd.transact_async(lambda t: t.add("tcp_in", f"127.0.0.1/{taken}"))
            assert not tx.committed and [r.errno_name for r in tx.fatal] == ["EADDRINUSE"]
            assert [r.listener.port for r in tx.results] == [taken]  # `port`'s missing family: not retried
            tx = await fwd.transact_async(
                lambda t: t.add("tcp_in", f"127.0.0.1/{taken}"), tolerate=lambda r: r.listener.port == taken
            )
            assert tx.committed and tx.fatal == [] and fwd.tables.tcp_in.target(taken) == taken
        finally:
            squatter.close()
            fwd.close()
            acc.close()

    run(main)
