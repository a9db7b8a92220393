"""TcpSockPort over real loopback sockets: peek offsets, discard, TCP_INFO on both kinds of socket."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator

import pytest

from passtd.dataplane.io import tcp as tcp_io
from passtd.dataplane.io.tcp import PEEK_OFF, PeekArena, TcpIo, TcpSockPort


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    client = socket.create_connection(srv.getsockname())
    server, _ = srv.accept()
    srv.close()
    yield client, server
    client.close()
    server.close()


def wait_acked(port: TcpSockPort, n: int) -> int:
    for _ in range(200):
        got = port.info().bytes_acked
        if got >= n:
            return got
        time.sleep(0.005)
    return port.info().bytes_acked


def test_bytes_acked_counts_payload_only_on_connected_and_accepted_sockets(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    arena = PeekArena()
    connected = TcpSockPort(client, arena, connected=True)
    accepted = TcpSockPort(server, arena, connected=False)
    assert connected.info().bytes_acked == 0 and accepted.info().bytes_acked == 0
    client.sendall(b"x" * 1000)
    server.sendall(b"y" * 777)
    assert wait_acked(connected, 1000) == 1000
    assert wait_acked(accepted, 777) == 777
    info = connected.info()
    assert info.snd_wnd > 0 and info.sndbuf > 0


def test_peeks_of_one_batch_do_not_overwrite_each_other(pair: tuple[socket.socket, socket.socket]) -> None:
    """Frames point into the arena until the batch is written: every peek gets its own region, a batch
    larger than the arena gets buffers of its own, and `reset` starts over."""
    client, server = pair
    server.setblocking(False)
    arena = PeekArena(64)
    port = TcpSockPort(server, arena, connected=False)
    client.sendall(bytes(range(200)))
    time.sleep(0.05)
    views = [port.peek(off, 40) for off in range(0, 200, 40)]
    assert [bytes(v) for v in views if v is not None] == [bytes(range(o, o + 40)) for o in range(0, 200, 40)]
    assert arena.used == 40  # the first fit; the rest had buffers of their own
    arena.reset()
    assert arena.used == 0
    again = port.peek(0, 10)
    assert again is not None and bytes(again) == bytes(range(10)) and arena.used == 10


def test_peek_at_offsets_discard_and_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    server.setblocking(False)
    port = TcpSockPort(server, PeekArena(), connected=False)
    assert port.peek(0, 10) is None  # nothing yet
    client.sendall(bytes(range(100)))
    time.sleep(0.05)
    first = port.peek(0, 10)
    assert first is not None and bytes(first) == bytes(range(10))
    more = port.peek(10, 20)
    assert more is not None and bytes(more) == bytes(range(10, 30))
    again = port.peek(5, 5)  # a rewind: peek again from an earlier offset
    assert again is not None and bytes(again) == bytes(range(5, 10))
    port.discard(30)
    rest = port.peek(0, 1000)
    assert rest is not None and bytes(rest) == bytes(range(30, 100))
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    if PEEK_OFF:
        end = port.peek(70, 10)
        assert end is not None and len(end) == 0  # end of stream beyond what was peeked
    port.discard(70)
    end = port.peek(0, 10)
    assert end is not None and len(end) == 0


def test_connect_refused_at_once_or_reported() -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    io = TcpIo()
    errors: list[str] = []
    io.on_error = lambda conn, reason: errors.append(reason)

    from passtd.dataplane.core.tcp import states
    from passtd.dataplane.core.tcp.conn import TcpConn

    conn = TcpConn(1, 6, (6, b"", 0, 0), 0.0, 0.0, target_addr=bytes((127, 0, 0, 1)), remote_port=port)
    conn.events = states.EV_GUEST_SYN
    try:
        conn.sock = io.connect(conn)
    except OSError as exc:  # refused before connect() returned: also a fast answer
        errors.append(f"connect_failed:{errno.errorcode[exc.errno or 0]}")
    else:
        for _ in range(100):
            io.poll()
            if errors:
                break
            time.sleep(0.01)
        conn.sock.close()
    assert errors == ["connect_failed:ECONNREFUSED"]
    io.close()


def test_peeks_without_so_peek_off(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels before 6.10 (Debian bookworm's 6.1) have no SO_PEEK_OFF for TCP: peeks start at the head of
    the queue, and the part past `offset` is copied into the arena, so views of one batch stay intact."""
    monkeypatch.setattr(tcp_io, "PEEK_OFF", False)
    client, server = pair
    server.setblocking(False)
    port = TcpSockPort(server, PeekArena(), connected=False)
    assert port.peek(0, 10) is None
    client.sendall(bytes(range(100)))
    time.sleep(0.05)
    first, second = port.peek(0, 10), port.peek(10, 20)
    assert first is not None and second is not None
    assert (bytes(first), bytes(second)) == (bytes(range(10)), bytes(range(10, 30)))
    assert port.peek(100, 10) is None  # nothing beyond what the guest has
    port.discard(30)
    rest = port.peek(0, 1000)
    assert rest is not None and bytes(rest) == bytes(range(30, 100))
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    port.discard(70)
    end = port.peek(0, 10)
    assert end is not None and len(end) == 0  # end of stream once everything was acknowledged
