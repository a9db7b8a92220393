"""The splice path's namespace socket pool and relay, against the real kernel (root only).

A host-loopback connection is joined by `Splicer` to a server listening on the loopback of a namespace the
test created (`pd-io-*`, deleted by the conftest fixture). Nothing leaves loopback; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from passtd.dataplane.core.flowtable import Flow, FlowTable
from passtd.dataplane.core.limits import plan_fd_pool
from passtd.dataplane.core.splice import SpliceFlow
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.io.netns import NsSocketPool, open_netns, run_in_netns
from passtd.dataplane.io.splice import SplicedPair, Splicer

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed"),
]

SIOCGSKNS = 0x894C  # <linux/sockios.h>: a descriptor of the network namespace a socket belongs to


def ns_ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def socket_ns(sock: socket.socket) -> tuple[int, int]:
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return ns_ident(fd)
    finally:
        os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def netns_fd(netns_name: str) -> Iterator[int]:
    subprocess.run(["ip", "-n", netns_name, "link", "set", "lo", "up"], check=True, timeout=10)
    fd = open_netns(netns_name)
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    splicer: Splicer
    flows: FlowTable
    stats: Stats
    netns_fd: int
    events: list[tuple[str, str]] = field(default_factory=list)

    def run_until(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            self.loop.run_until_complete(asyncio.sleep(0.005))

    def ns_listener(self) -> socket.socket:
        """A server socket on the namespace's 127.0.0.1 (any port)."""
        sock: socket.socket = run_in_netns(self.netns_fd, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        return sock

    def spliced_client(self, ns_port: int) -> socket.socket:
        """A host-loopback client whose accepted end is spliced to ns_port inside the namespace."""
        with socket.socket() as lst:
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            client = socket.create_connection(lst.getsockname(), timeout=10)
            accepted, peer = lst.accept()
        self.splicer.splice(accepted, peer, ns_port, in_netns=True, now=self.loop.time())
        return client


@pytest.fixture
def env(netns_fd: int) -> Iterator[Env]:
    loop = asyncio.new_event_loop()
    flows = FlowTable(pool=plan_fd_pool(1024, open_fds()))
    stats = Stats()
    events: list[tuple[str, str]] = []

    def emit(kind: str, flow: Flow, state: str, reason: str) -> None:
        events.append((kind, reason))

    splicer = Splicer(loop, flows, stats, emit)
    splicer.netns_fd = netns_fd
    try:
        yield Env(loop, splicer, flows, stats, netns_fd, events)
    finally:
        splicer.close_all()
        splicer.netns_fd = None
        loop.close()


def test_pool_refills_in_one_batch_with_sockets_of_the_namespace(netns_fd: int) -> None:
    pool = NsSocketPool(netns_fd, 8)
    try:
        assert pool.take(socket.AF_INET) is None  # nothing made before a family is asked for
        assert pool.refill() == 8 and pool.refills == 1 and len(pool) == 8
        theirs = ns_ident(netns_fd)
        assert theirs != (os.stat("/proc/self/ns/net").st_dev, os.stat("/proc/self/ns/net").st_ino)
        taken = [pool.take(socket.AF_INET) for _ in range(4)]
        assert all(s is not None and socket_ns(s) == theirs for s in taken)
        assert all(socket_ns(s) == theirs for s in pool.free[socket.AF_INET])
        assert pool.low() and pool.take(socket.AF_INET6) is None
        assert pool.refill() == 4 + 8  # both families topped up by one more thread, not one per socket
        assert pool.refills == 2 and len(pool.free[socket.AF_INET6]) == 8
        for s in taken:
            assert s is not None
            s.close()
    finally:
        pool.close()
    assert len(pool) == 0


def is_pending(pool: NsSocketPool) -> bool:
    return pool.pending


def test_background_refill_comes_from_a_worker_in_the_namespace(netns_fd: int) -> None:
    loop = asyncio.new_event_loop()
    pool = NsSocketPool(netns_fd, 6)
    threads = threading.active_count()
    try:
        assert pool.take(socket.AF_INET6) is None
        for round_ in range(3):
            assert pool.refill_soon(loop) and pool.pending
            assert not pool.refill_soon(loop)  # one batch at a time
            deadline = time.monotonic() + 10
            while is_pending(pool):
                assert time.monotonic() < deadline
                loop.run_until_complete(asyncio.sleep(0.005))
            assert len(pool.free[socket.AF_INET6]) == 6, pool.last_error
            assert all(socket_ns(s) == ns_ident(netns_fd) for s in pool.free[socket.AF_INET6])
            assert not pool.refill_soon(loop)  # full: nothing to do
            for _ in range(3 + round_):
                sock = pool.take(socket.AF_INET6)
                assert sock is not None
                sock.close()
        assert threading.active_count() == threads + 1  # one worker for every batch, not one per batch
        assert pool.refills == 3 and pool.failures == 0
    finally:
        pool.close()
        loop.close()
    deadline = time.monotonic() + 10
    while threading.active_count() > threads:  # the worker ends with the pool
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_pool_size_is_a_share_of_the_reserve(env: Env) -> None:
    pool = env.flows.pool
    assert pool is not None and env.splicer.ns_pool is not None
    assert 0 < 2 * env.splicer.ns_pool.size <= pool.reserved // 4


def echo_server(lst: socket.socket, *, reset: bool = False) -> threading.Thread:
    """Serves one connection: reads to EOF, answers with what it read reversed, closes (or resets)."""

    def body() -> None:
        lst.settimeout(10)
        conn, _ = lst.accept()
        with conn:
            conn.settimeout(10)
            if reset:
                conn.recv(100)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return
            data = bytearray()
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(bytes(reversed(data)))

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def read_all(sock: socket.socket, out: list[bytes | BaseException]) -> threading.Thread:
    def body() -> None:
        data = bytearray()
        try:
            while chunk := sock.recv(65536):
                data += chunk
            out.append(bytes(data))
        except OSError as exc:
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def finished(*threads: threading.Thread) -> Callable[[], bool]:
    return lambda: not any(t.is_alive() for t in threads)


def recv_error(sock: socket.socket) -> int:
    """Reads until EOF or an error: the errno, 0 at EOF."""
    sock.settimeout(10)
    try:
        while sock.recv(10):
            pass
    except OSError as exc:
        return exc.errno or -1
    return 0


def test_spliced_connections_relay_both_ways_with_half_close(env: Env) -> None:
    base = open_fds()
    with env.ns_listener() as lst:
        port = lst.getsockname()[1]
        for i in range(6):  # past the pool's first refill: the first is made the slow way, the rest pooled
            server = echo_server(lst)
            client = env.spliced_client(port)
            payload = os.urandom(300_000 + i)
            got: list[bytes | BaseException] = []
            reader = read_all(client, got)
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)  # half-close: the answer still flows back
            env.run_until(finished(reader, server))
            assert got == [bytes(reversed(payload))]
            client.close()
            env.run_until(lambda: not any(isinstance(f, SpliceFlow) for f in env.flows))
            env.run_until(lambda: env.splicer.ns_pool is not None and not env.splicer.ns_pool.pending)
    assert env.splicer.pool_misses == 1  # only the first connection, before the family was stocked
    assert env.events.count(("closed", "fin")) == 6
    assert env.flows.fds == 0
    assert env.splicer.buffers.made <= 2  # buffers reused, not one pair per connection
    pool = env.splicer.ns_pool
    assert pool is not None and pool.refills >= 1
    assert env.splicer.poller is not None
    assert open_fds() == base + len(pool) + 1  # what is left open: the pool's stock and the splice epoll
    env.splicer.close_all()
    assert open_fds() == base


def test_reset_in_the_namespace_reaches_the_host_client(env: Env) -> None:
    with env.ns_listener() as lst:
        server = echo_server(lst, reset=True)
        client = env.spliced_client(lst.getsockname()[1])
        got: list[bytes | BaseException] = []
        reader = read_all(client, got)
        client.sendall(b"hello")
        env.run_until(finished(reader, server))
        client.close()
    assert len(got) == 1 and isinstance(got[0], ConnectionResetError)
    assert ("closed", "reset") in env.events
    assert env.flows.fds == 0


def test_empty_pool_falls_back_to_a_socket_made_in_the_namespace(env: Env) -> None:
    pool = env.splicer.ns_pool
    assert pool is not None
    assert pool.take(socket.AF_INET) is None
    pool.refill()
    while (s := pool.take(socket.AF_INET)) is not None:  # exhausted, as after a burst
        s.close()
    with env.ns_listener() as lst:
        server = echo_server(lst)
        client = env.spliced_client(lst.getsockname()[1])  # refused would be a failure: slower, not refused
        pair = next(f for f in env.flows if isinstance(f, SpliceFlow)).pair
        assert isinstance(pair, SplicedPair)
        assert socket_ns(pair.b) == ns_ident(env.netns_fd)  # made in the namespace the slow way
        got: list[bytes | BaseException] = []
        reader = read_all(client, got)
        client.sendall(b"abc")
        client.shutdown(socket.SHUT_WR)
        env.run_until(finished(reader, server))
        client.close()
    assert got == [b"cba"]
    assert env.splicer.pool_misses == 1
    env.run_until(lambda: len(pool.free[socket.AF_INET]) == pool.size)  # refilled after the miss


def test_refused_connect_in_the_namespace_resets_the_client(env: Env) -> None:
    with env.ns_listener() as lst:
        port = lst.getsockname()[1]
    client = env.spliced_client(port)  # nothing listens there any more
    assert recv_error(client) == errno.ECONNRESET
    client.close()
    assert env.stats.handled["tcp.splice.refused"] == 1
    assert env.flows.fds == 0


def test_full_flow_table_takes_nothing_from_the_pool(env: Env) -> None:
    pool = env.splicer.ns_pool
    assert pool is not None
    pool.take(socket.AF_INET)
    pool.refill()
    stocked = len(pool)
    env.flows.max_flows = 0
    client = env.spliced_client(9)
    assert recv_error(client) == errno.ECONNRESET
    client.close()
    assert len(pool) == stocked and env.stats.dropped
