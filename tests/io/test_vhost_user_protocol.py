"""Hostile front-end messages without rings: the framing under any chunking, and the device against random
requests. Invariant: a message is framed whole or the stream is refused with VhostUserError; the device
either applies a message or raises VhostUserError; nothing else escapes and no descriptor leaks."""

from __future__ import annotations

import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from passtd.dataplane.io.vhost_user import protocol as p
from passtd.dataplane.io.vhost_user.device import VhostUserDevice

messages = st.lists(
    st.tuples(st.integers(0, 40), st.binary(max_size=300)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(msgs=messages, cuts=st.lists(st.integers(1, 64), max_size=30))
def test_framing_survives_any_chunking(msgs: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(p.encode_request(req, payload) for req, payload in msgs)
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        reader = p.MessageReader(a)
        got: list[p.Message] = []
        pos = 0
        for cut in [*cuts, len(stream)]:
            chunk = stream[pos : pos + cut]
            pos += len(chunk)
            if chunk:
                b.send(chunk)
                got += reader.read()
        assert [(m.request, m.payload) for m in got] == msgs
    finally:
        a.close()
        b.close()


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_frame_or_refuse(data: bytes) -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        reader = p.MessageReader(a)
        if data:
            b.send(data)
        try:
            for msg in reader.read() if data else []:
                assert len(msg.payload) <= p.MAX_PAYLOAD
        except p.VhostUserError:
            pass
    finally:
        a.close()
        b.close()


requests = st.sampled_from(sorted(p.NAMES)) | st.integers(0, 60)
payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda i, n: p.VRING_STATE.pack(i, n), st.integers(0, 3), st.integers(0, 70000)),
    st.builds(lambda v: p.U64.pack(v), st.integers(0, 2**64 - 1)),
)


@settings(max_examples=300, deadline=None)
@given(script=st.lists(st.tuples(requests, payloads, st.booleans(), st.integers(0, 2)), max_size=20))
def test_device_applies_or_refuses_random_requests(script: list[tuple[int, bytes, bool, int]]) -> None:
    """Random requests, with NEED_REPLY or not and with up to two stray eventfds: replies are well formed,
    errors are VhostUserError, and every descriptor sent is closed or kept by a ring."""
    dev = VhostUserDevice()
    before = len(os.listdir("/proc/self/fd"))
    try:
        for request, payload, need_reply, nfds in script:
            fds = [os.eventfd(0) for _ in range(nfds)]
            flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
            try:
                reply = dev.handle(p.Message(request, flags, payload, fds))
            except p.VhostUserError:
                continue
            if reply:
                req, rflags, size = p.HEADER.unpack_from(reply)
                assert req == request and rflags & p.FLAG_REPLY and size == len(reply) - p.HEADER.size
    finally:
        dev.close()
    assert len(os.listdir("/proc/self/fd")) == before
