"""The vhost-user back-end through its real socket and real shared memory, driven by the tests' front end
(tests/io/vhost_frontend.py plays qemu and the guest's driver): negotiation, replies and acks, frames both
ways with offload headers, mergeable buffers, the receive backlog, kicks and calls, ring stop and restart,
protocol errors, descriptor hygiene, a reconnect, and the dataplane answering a guest over it.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from passtd.dataplane.io.guestsock import GuestListener
from passtd.dataplane.io.vhost_user import protocol as p
from passtd.dataplane.io.vhost_user.backend import MAX_PENDING, VhostUserBackend
from passtd.dataplane.io.vhost_user.device import FEATURES, PROTOCOL_FEATURES
from passtd.dataplane.io.vhost_user.net import (
    F_PROTOCOL_FEATURES,
    F_VERSION_1,
    NET_F_GUEST_CSUM,
    NET_F_GUEST_TSO4,
    NET_F_GUEST_TSO6,
    NET_F_HOST_TSO4,
    NET_F_MRG_RXBUF,
    RING_F_INDIRECT_DESC,
)
from passtd.dataplane.io.vhost_user.virtqueue import AVAIL_F_NO_INTERRUPT, DESC_F_NEXT
from passtd.errors import BackendError, MalformedFrame
from tests.io.vhost_frontend import FrontEnd, gpa_to_uva

FRAME = bytes(range(256)) * 6  # 1536 bytes


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@dataclass
class Pair:
    loop: asyncio.AbstractEventLoop
    backend: VhostUserBackend
    fe: FrontEnd
    received: list[bytes]

    def pump(self) -> list[bytes]:
        """One wake-up of the back-end, as the dataplane's reader callback; returns the frames it gave."""
        frames = [bytes(f) for f in self.backend.recv_batch(64)]
        self.received.extend(frames)
        return frames

    def run_soon(self) -> None:
        """Let callbacks the back-end scheduled (on_drained) run."""
        self.loop.run_until_complete(asyncio.sleep(0))


@pytest.fixture
def pair() -> Iterator[Pair]:
    before = open_fds()
    loop = asyncio.new_event_loop()
    a, b = socket.socketpair()
    backend = VhostUserBackend(a, loop)
    received: list[bytes] = []
    holder: list[Pair] = []
    fe = FrontEnd(b, lambda: holder[0].pump())
    holder.append(Pair(loop, backend, fe, received))
    try:
        yield holder[0]
    finally:
        backend.close()
        fe.close()
        b.close()
        loop.close()
        assert open_fds() <= before, "descriptors leaked"


def test_negotiation_replies_and_acks(pair: Pair) -> None:
    fe, dev = pair.fe, pair.backend.device
    features = fe.setup()
    assert features == FEATURES
    assert (
        features >> F_VERSION_1 & 1
        and features >> NET_F_MRG_RXBUF & 1
        and features >> F_PROTOCOL_FEATURES & 1
    )
    assert dev.protocol_features == PROTOCOL_FEATURES
    assert dev.owner and dev.net.mergeable and dev.net.hdr_len == 12
    assert dev.net.rx.ready and dev.net.tx.ready
    # REPLY_ACK: a request with NEED_REPLY is acked, 0 for done, 1 for a request we do not implement
    assert fe.acked(p.NET_SET_MTU, p.U64.pack(1500)) == 0
    assert dev.mtu == 1500
    assert fe.acked(99) == 1
    assert fe.call_u64(p.GET_QUEUE_NUM) == 1
    # the config space: link up, one queue pair, the MTU just set
    fe.send(p.GET_CONFIG, p.CONFIG_HEADER.pack(0, 12, 0) + bytes(12))
    reply = fe.reply(p.GET_CONFIG)
    assert p.CONFIG_HEADER.unpack_from(reply) == (0, 12, 0)
    assert struct.unpack_from("<6sHHH", reply, 12) == (bytes(6), 1, 1, 1500)
    fe.send(p.GET_CONFIG, p.CONFIG_HEADER.pack(10, 2, 0) + bytes(2))
    assert fe.reply(p.GET_CONFIG)[12:] == struct.pack("<H", 1500)
    assert fe.acked(p.SET_CONFIG, p.CONFIG_HEADER.pack(0, 6, 0) + bytes(6)) == 0


def test_rings_start_disabled_with_protocol_features_until_enabled(pair: Pair) -> None:
    fe = pair.fe
    fe.setup(enable=False)
    rx, tx = pair.backend.device.queues
    assert not rx.ready and not tx.ready
    fe.tx(FRAME)
    fe.kick_queue(1)
    assert pair.pump() == []
    fe.send(p.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    assert pair.received == [FRAME]


def test_without_protocol_features_rings_run_from_the_kick_and_the_header_is_legacy(pair: Pair) -> None:
    fe = pair.fe
    features = fe.setup(features=1 << NET_F_GUEST_CSUM)  # no VERSION_1, no MRG_RXBUF: a 10-byte header
    assert features == 1 << NET_F_GUEST_CSUM and fe.hdr_len == 10
    assert pair.backend.device.net.hdr_len == 10
    fe.tx(FRAME, pieces=4)
    fe.kick_queue(1)
    pair.pump()
    assert pair.received == [FRAME]
    fe.post_rx(2, 2048)
    pair.pump()
    pair.backend.send_batch([FRAME[:100]])
    [(hdr, frame)] = fe.read_rx()
    assert hdr == bytes(10) and frame == FRAME[:100]


def test_transmit_chains_in_pieces_and_indirect_tables(pair: Pair) -> None:
    fe = pair.fe
    fe.setup()
    fe.tx(FRAME, pieces=1)
    fe.tx(FRAME[:60], pieces=7)  # header split across descriptors too
    data = bytes(12) + FRAME[:500]
    buf = fe.alloc(len(data))
    fe.rings[1].write(buf, data)
    table = fe.alloc(16 * 3)
    fe.rings[1].add_indirect(table, [(buf, 5), (buf + 5, 200), (buf + 205, len(data) - 205)], writable=False)
    fe.kick_queue(1)
    pair.pump()
    assert pair.received == [FRAME, FRAME[:60], FRAME[:500]]
    used = fe.rings[1].take_used()
    assert len(used) == 3 and all(length == 0 for _, length in used)
    assert fe.calls(1) >= 1  # the guest is told its transmit buffers are free


def test_guest_tso_frames_pass_with_their_header_skipped(pair: Pair) -> None:
    """A guest that negotiated HOST_TSO4 sends a 20 000-byte TCP super-segment with a partial checksum: the
    dataplane gets it as one frame (the header is the guest's request, not part of the frame)."""
    fe = pair.fe
    features = fe.setup()
    assert features >> NET_F_HOST_TSO4 & 1
    big = bytes(14) + bytes(20000)
    fe.tx(big, hdr=struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0), pieces=5)
    fe.kick_queue(1)
    pair.pump()
    assert pair.received == [big]


def test_receive_mergeable_buffers_offload_header_and_num_buffers(pair: Pair) -> None:
    fe = pair.fe
    features = fe.setup()
    assert features >> NET_F_GUEST_TSO4 & 1 and features >> NET_F_GUEST_TSO6 & 1
    fe.post_rx(32, 1024)
    pair.pump()
    vnet = struct.pack("<BBHHHH", 1, 1, 66, 1448, 34, 16)  # the dataplane's TSO4 header
    head, payload = bytes(66), bytes(range(256)) * 40  # 10 240 payload bytes: 11 buffers of 1024
    pair.backend.send_batch([(vnet, head, payload), FRAME[:60]])
    got = fe.read_rx()
    assert [frame for _, frame in got] == [head + payload, FRAME[:60]]
    hdr, _ = got[0]
    assert hdr == vnet + struct.pack("<H", -(-(12 + 66 + len(payload)) // 1024))
    assert got[1][0] == bytes(10) + struct.pack("<H", 1)
    assert fe.calls(0) >= 1


def test_receive_backlog_waits_for_the_refill_in_order_then_drains(pair: Pair) -> None:
    fe, backend = pair.fe, pair.backend
    fe.setup()
    drained: list[int] = []
    backend.on_drained = lambda: drained.append(backend.backlog)
    fe.post_rx(2, 2048)
    pair.pump()
    frames = [bytes([i]) * 1500 for i in range(10)]
    backend.send_batch(frames[:6])
    backend.send_batch(frames[6:])
    assert backend.backlog == 8 * 1500 and backend.dropped_tx == 0
    fe.post_rx(3, 2048)  # a refill and its kick: three more frames go in
    pair.pump()
    assert backend.backlog == 5 * 1500
    fe.post_rx(16, 2048)
    pair.pump()
    pair.run_soon()
    assert backend.backlog == 0 and drained == [0]
    assert [f for _, f in fe.read_rx()] == frames
    # past MAX_PENDING new frames are dropped and counted, never queued without bound
    fe.rings[0].take_used()
    backend.send_batch([bytes(60000)] * (MAX_PENDING // 60000 + 40))
    assert backend.backlog <= MAX_PENDING and backend.dropped_tx > 0


def test_transmit_beyond_the_batch_limit_keeps_the_backend_readable(pair: Pair) -> None:
    """The guest kicks once for many frames: what one batch leaves in the ring must wake us again."""
    fe, backend = pair.fe, pair.backend
    fe.setup()
    for i in range(100):
        fe.tx(bytes([i]) * 100)
    fe.kick_queue(1)
    assert len(backend.recv_batch(64)) == 64
    ready, _, _ = select.select([backend.fileno()], [], [], 0)
    assert ready, "frames remain but the epoll descriptor is not readable"
    assert len(backend.recv_batch(64)) == 36
    ready, _, _ = select.select([backend.fileno()], [], [], 0)
    assert not ready


def test_no_interrupt_flag_suppresses_calls(pair: Pair) -> None:
    fe = pair.fe
    fe.setup()
    fe.calls(1)
    fe.rings[1].set_avail_flags(AVAIL_F_NO_INTERRUPT)
    fe.tx(FRAME)
    fe.kick_queue(1)
    pair.pump()
    assert pair.received == [FRAME] and fe.calls(1) == 0
    fe.rings[1].set_avail_flags(0)
    fe.tx(FRAME)
    fe.kick_queue(1)
    pair.pump()
    assert fe.calls(1) == 1


def test_get_vring_base_stops_the_ring_and_a_restart_continues(pair: Pair) -> None:
    fe, backend = pair.fe, pair.backend
    fe.setup()
    fe.post_rx(4, 1024)
    pair.pump()
    # a frame that needs 3 buffers, then one that needs 2 of the last one: one chain stays held
    backend.send_batch([bytes(2500), bytes(1500)])
    assert len(fe.read_rx()) == 1
    fe.send(p.GET_VRING_BASE, p.VRING_STATE.pack(0, 0))
    index, base = p.VRING_STATE.unpack(fe.reply(p.GET_VRING_BASE))
    assert (index, base) == (0, 3)  # the held chain was not used: the next start takes it again
    assert not backend.device.net.rx.ready
    assert backend.backlog == 1500  # the second frame waits for buffers
    backend.send_batch([FRAME])  # stopped: dropped, not queued
    assert backend.backlog == 1500 and backend.dropped_tx == 1
    # qemu restarts the ring where it stopped
    fe.send(p.SET_VRING_BASE, p.VRING_STATE.pack(0, base))
    # qemu sends the same eventfd again: the stopped ring's entry must have left the epoll set
    fe.send(p.SET_VRING_KICK, p.U64.pack(0), [fe.kick[0]])
    fe.post_rx(2, 1024)
    pair.pump()
    assert backend.backlog == 0
    backend.send_batch([FRAME[:100]])
    assert [f for _, f in fe.read_rx()] == [bytes(1500), FRAME[:100]]


def test_a_looping_chain_is_counted_and_the_queue_goes_on(pair: Pair) -> None:
    fe = pair.fe
    fe.setup()
    ring = fe.rings[1]
    a, b = ring.free.pop(), ring.free.pop()
    buf = fe.alloc(64)
    ring.set_desc(a, buf, 32, DESC_F_NEXT, b)
    ring.set_desc(b, buf + 32, 32, DESC_F_NEXT, a)
    ring.chains[a] = [a, b]
    ring.offer(a)
    fe.tx(FRAME)
    fe.kick_queue(1)
    pair.pump()
    assert pair.received == [FRAME]
    assert pair.backend.drops == {"vhost.chain_loop": 1}
    used = dict(ring.take_used())
    assert len(used) == 2 and used[a] == 0  # the bad chain went back to the guest, unwritten


@pytest.mark.parametrize(
    ("request_", "payload", "fds", "why"),
    [
        (p.SET_FEATURES, p.U64.pack(1 << 40), 0, "not offered"),
        (p.SET_VRING_NUM, p.VRING_STATE.pack(0, 100), 0, "power of two"),
        (p.SET_VRING_NUM, p.VRING_STATE.pack(5, 256), 0, "queue 5"),
        (
            p.SET_MEM_TABLE,
            p.MEMORY_HEADER.pack(2, 0) + p.MEMORY_REGION.pack(0, 4096, 0, 0) * 2,
            1,
            "descriptors",
        ),
        (p.SET_MEM_TABLE, p.MEMORY_HEADER.pack(1, 0) + p.MEMORY_REGION.pack(0, 1 << 30, 0, 0), 1, "file"),
        (p.SET_VRING_KICK, p.U64.pack(0x100), 0, "polling"),
        (p.SET_VRING_CALL, p.U64.pack(0), 0, "one descriptor"),
        (
            p.SET_VRING_ADDR,
            p.VRING_ADDR.pack(0, 0, 1 << 50, 1 << 50, 1 << 50, 0),
            0,
            "not in the memory table",
        ),
        (p.SET_OWNER, bytes(p.MAX_PAYLOAD + 1), 0, "payload of"),
    ],
)
def test_protocol_errors_drop_the_connection_and_close_descriptors(
    pair: Pair, request_: int, payload: bytes, fds: int, why: str
) -> None:
    fe, backend = pair.fe, pair.backend
    fe.send(p.SET_OWNER)
    fe.send(p.SET_VRING_NUM, p.VRING_STATE.pack(0, 256))
    memfd = os.memfd_create("small")
    os.ftruncate(memfd, 4096)
    try:
        fe.send(p.SET_MEM_TABLE, p.MEMORY_HEADER.pack(1, 0) + p.MEMORY_REGION.pack(0, 4096, 0, 0), [memfd])
        with pytest.raises(MalformedFrame, match=r"vhost_user\.protocol"):
            fe.send(request_, payload, [memfd] * fds)
    finally:
        os.close(memfd)
    assert why in backend.error


def test_closed_socket_is_eof(pair: Pair) -> None:
    pair.fe.setup()
    pair.fe.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError):
        pair.pump()


def test_reconnect_after_qemu_restarts(tmp_path: object) -> None:
    """The listener accepts a new front end after the first one went away; the new device starts fresh."""
    path = os.path.join(str(tmp_path), "vu.sock")
    listener = GuestListener(path)
    loop = asyncio.new_event_loop()
    try:
        for round_ in range(2):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(path)
            conn = listener.accept()
            assert conn is not None
            backend = VhostUserBackend(conn, loop)
            got: list[bytes] = []
            fe = FrontEnd(client, lambda b=backend, g=got: g.extend(bytes(f) for f in b.recv_batch(64)))  # type: ignore[misc]
            try:
                fe.setup()
                fe.tx(bytes([round_]) * 100)
                fe.kick_queue(1)
                fe.pump()
                assert got == [bytes([round_]) * 100]
                client.close()
                with pytest.raises(EOFError):
                    backend.recv_batch(64)
            finally:
                backend.close()
                fe.close()
    finally:
        listener.close()
        loop.close()
    assert not os.path.exists(path)


def test_from_fd_refuses_what_is_not_a_unix_stream_socket() -> None:
    loop = asyncio.new_event_loop()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(BackendError, match="not a UNIX stream socket"):
            VhostUserBackend.from_fd(udp.fileno(), loop)
        a, b = socket.socketpair()
        backend = VhostUserBackend.from_fd(a.detach(), loop)
        backend.close()
        b.close()
    finally:
        udp.close()
        loop.close()


def test_indirect_needs_the_feature(pair: Pair) -> None:
    fe = pair.fe
    fe.setup(features=FEATURES & ~(1 << RING_F_INDIRECT_DESC))
    data = bytes(12) + FRAME
    buf = fe.alloc(len(data))
    fe.rings[1].write(buf, data)
    fe.rings[1].add_indirect(fe.alloc(16), [(buf, len(data))], writable=False)
    fe.kick_queue(1)
    pair.pump()
    assert pair.received == [] and pair.backend.drops == {"vhost.indirect_flags": 1}


def test_descriptors_go_to_their_message_when_reads_coalesce_or_split(pair: Pair) -> None:
    """Two messages read at once (the first without descriptors), and one message split across reads: the
    eventfd still lands on SET_VRING_CALL, and the split message is framed whole."""
    fe, backend = pair.fe, pair.backend
    fe.sock.send(p.encode_request(p.SET_OWNER))
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fe.sock.sendmsg(
            [p.encode_request(p.SET_VRING_CALL, p.U64.pack(1))],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", call))],
        )
        pair.pump()
        assert backend.device.owner and backend.device.queues[1].call_fd >= 0
        assert os.path.samestat(os.fstat(backend.device.queues[1].call_fd), os.fstat(call))
    finally:
        os.close(call)
    data = p.encode_request(p.GET_FEATURES)
    fe.sock.send(data[:5])
    pair.pump()
    fe.sock.send(data[5:])
    pair.pump()
    assert p.U64.unpack(fe.reply(p.GET_FEATURES))[0] == FEATURES


@pytest.mark.parametrize("request_", [p.RESET_DEVICE, p.RESET_OWNER])
def test_reset_stops_the_rings_and_a_new_setup_works(pair: Pair, request_: int) -> None:
    fe, backend = pair.fe, pair.backend
    fe.setup()
    assert fe.acked(request_) == 0
    dev = backend.device
    assert not dev.net.rx.ready and not dev.net.tx.ready and dev.features == 0
    assert all(vq.kick_fd < 0 and vq.call_fd < 0 for vq in dev.queues)
    fe.rings = [type(r)(r.mem, r.size, r.desc, r.avail, r.used) for r in fe.rings]  # a fresh driver
    for ring in fe.rings:
        ring.write(ring.avail, bytes(4))
        ring.write(ring.used, bytes(4))
    fe.setup()
    fe.tx(FRAME)
    fe.kick_queue(1)
    pair.pump()
    assert pair.received == [FRAME]


def test_ring_addresses_before_the_memory_table_wait_for_it(pair: Pair) -> None:
    fe, backend = pair.fe, pair.backend
    fe.send(p.SET_OWNER)
    fe.send(p.SET_FEATURES, p.U64.pack(FEATURES))
    ring = fe.rings[1]
    fe.send(p.SET_VRING_NUM, p.VRING_STATE.pack(1, fe.qsize))
    fe.send(
        p.SET_VRING_ADDR,
        p.VRING_ADDR.pack(1, 0, *(gpa_to_uva(a) for a in (ring.desc, ring.used, ring.avail)), 0),
    )
    assert not backend.device.net.tx.mapped
    fe.send(p.SET_MEM_TABLE, fe.mem_table_payload(), [fe.memfd, fe.memfd])
    assert backend.device.net.tx.mapped


def test_a_new_memory_table_returns_held_receive_chains(pair: Pair) -> None:
    """A chain taken for a frame that did not fit is given back unused when the table is replaced (its view
    belongs to the old mapping), so the guest does not lose the buffer."""
    fe, backend = pair.fe, pair.backend
    fe.setup()
    [head] = fe.post_rx(1, 1024)
    pair.pump()
    backend.send_batch([bytes(1500)])  # needs two buffers: the one there is held
    assert backend.device.net.held_count() == 1 and backend.backlog == 1500
    fe.send(p.SET_MEM_TABLE, fe.mem_table_payload(), [fe.memfd, fe.memfd])
    assert fe.rings[0].take_used() == [(head, 0)]
    assert backend.device.net.held_count() == 0


def test_kicks_suppressed_only_while_the_backend_comes_back_by_itself(pair: Pair) -> None:
    """USED_F_NO_NOTIFY (virtio §2.7.10) is set while frames wait beyond the batch (the wake eventfd brings
    the back-end back), cleared as soon as the ring is drained, and never left set for the next back-end."""
    fe, backend = pair.fe, pair.backend
    fe.setup()
    ring = fe.rings[1]

    def used_flags() -> int:
        return int.from_bytes(ring.read(ring.used, 2), "little")

    assert used_flags() == 0
    for i in range(100):
        fe.tx(bytes([i]) * 100)
    fe.kick_queue(1)
    assert len(backend.recv_batch(64)) == 64
    assert used_flags() == 1, "frames wait and the back-end will be back: no kick needed"
    fe.tx(FRAME)  # added while kicks are off: picked up without one
    assert len(backend.recv_batch(64)) == 37
    assert used_flags() == 0, "ring drained: the next frame must kick"
    for i in range(70):
        fe.tx(bytes([i]) * 100)
    fe.kick_queue(1)
    assert len(backend.recv_batch(64)) == 64 and used_flags() == 1
    fe.send(p.GET_VRING_BASE, p.VRING_STATE.pack(1, 0))
    fe.reply(p.GET_VRING_BASE)
    assert used_flags() == 0, "a stopped ring keeps no NO_NOTIFY for whoever runs it next"
