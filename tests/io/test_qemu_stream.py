"""qemu stream framing: frames split anywhere, many frames per read, bad lengths end the stream."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.dataplane.io.guestsock import bind_unix_listener
from passtd.dataplane.io.tap.qemu_stream import MAX_FRAME, FrameDecoder, QemuStreamBackend
from passtd.errors import BackendError, MalformedFrame

frames_st = st.lists(st.binary(min_size=14, max_size=300), max_size=20)


def encode(frames: list[bytes]) -> bytes:
    return b"".join(struct.pack("!I", len(f)) + f for f in frames)


@given(frames=frames_st, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_decoder_reassembles_any_chunking(frames: list[bytes], cuts: list[int]) -> None:
    stream = encode(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder(capacity=70_000)
    got: list[bytes] = []
    for a, b in itertools.pairwise(points):
        decoder.feed(stream[a:b])
        got.extend(bytes(f) for f in decoder.frames(1000))
    assert got == frames


def test_decoder_byte_at_a_time_and_limit() -> None:
    frames = [bytes([i]) * (14 + i) for i in range(10)]
    stream = encode(frames)
    decoder = FrameDecoder(capacity=4096)
    got: list[bytes] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        got.extend(bytes(f) for f in decoder.frames(1))
    got.extend(bytes(f) for f in decoder.frames(100))
    assert got == frames


@pytest.mark.parametrize("length", [0, 13, MAX_FRAME + 1, 0xFFFFFFFF])
def test_decoder_rejects_impossible_lengths(length: int) -> None:
    decoder = FrameDecoder(capacity=4096)
    decoder.feed(struct.pack("!I", length) + b"x" * 20)
    with pytest.raises(MalformedFrame, match=r"stream\.bad_length"):
        decoder.frames(10)


@given(st.binary(max_size=2000))
def test_decoder_arbitrary_bytes(data: bytes) -> None:
    decoder = FrameDecoder(capacity=4096)
    try:
        decoder.feed(data)
        decoder.frames(100)
    except MalformedFrame:
        pass


def drain(backend: QemuStreamBackend) -> None:
    for _ in range(10):
        backend.recv_batch(64)


def test_backend_over_socketpair_round_trip() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend = QemuStreamBackend(ours, loop)
        frames = [b"A" * 60, b"B" * 1500, b"C" * 65000]
        theirs.sendall(encode(frames))
        got: list[bytes] = []
        for _ in range(100):
            got.extend(bytes(f) for f in backend.recv_batch(64))
            if len(got) == 3:
                break
            await asyncio.sleep(0.01)
        assert got == frames
        # Writes larger than the socket buffer are kept whole in the pending buffer and flushed later.
        big = [bytes([i % 251]) * 65000 for i in range(40)]
        backend.send_batch(big)
        theirs.setblocking(False)
        received = bytearray()
        want = len(encode(big))
        for _ in range(500):
            try:
                received += theirs.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.005)
            if len(received) >= want:
                break
        assert bytes(received) == encode(big)
        assert backend.dropped_tx == 0
        theirs.close()
        with pytest.raises(EOFError):
            drain(backend)
        backend.close()
        backend.close()

    asyncio.run(scenario())


def test_listener_refuses_live_path_and_replaces_stale(tmp_path: object) -> None:
    path = f"{tmp_path}/s.sock"
    live = bind_unix_listener(path)
    assert oct(__import__("os").stat(path).st_mode & 0o777) == "0o600"
    with pytest.raises(BackendError, match="already in use by another server"):
        bind_unix_listener(path)
    live.close()  # the file stays behind, nobody listens: stale
    again = bind_unix_listener(path)
    again.close()


def test_backlog_keeps_order_across_batches_drains_and_drops_past_the_limit() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        backend = QemuStreamBackend(ours, loop)
        drained: list[int] = []
        backend.on_drained = lambda: drained.append(backend.backlog)
        sent: list[bytes] = []
        for batch in range(30):  # 30 batches of 3 frames, 2.3 MB in all: most of it waits in the backlog
            frames = [bytes([batch]) * size for size in (60, 1500, 25000)]
            backend.send_batch(frames)
            sent.extend(frames)
        assert backend.backlog > 0 and backend.dropped_tx == 0
        over = [b"x" * 60000] * 100  # beyond MAX_PENDING: dropped and counted, never queued
        backend.send_batch(over)
        assert 0 < backend.dropped_tx <= 100
        sent.extend(over[: 100 - backend.dropped_tx])
        theirs.setblocking(False)
        received = bytearray()
        want = len(encode(sent))
        for _ in range(5000):
            try:
                received += theirs.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.002)
            if len(received) >= want and drained:
                break
        assert bytes(received) == encode(sent)
        assert drained == [0] and backend.backlog == 0
        backend.close()
        theirs.close()

    asyncio.run(scenario())
