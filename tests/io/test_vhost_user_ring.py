"""The ring walker against hostile guest memory, without qemu: a memfd mapped as the guest's memory (two
regions with a hole, as the real table has), descriptor tables, avail rings and indirect tables written by
Hypothesis. Invariants: no exception; every buffer handed out lies inside one region's mapping; the work is
bounded; every consumed chain is either good or counted; receive frames write nothing but the guest's
writable buffers and the used ring.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from passtd.dataplane.io.vhost_user.memory import MemoryTable, map_region
from passtd.dataplane.io.vhost_user.net import (
    F_VERSION_1,
    NET_F_GUEST_CSUM,
    NET_F_GUEST_TSO4,
    NET_F_MRG_RXBUF,
    PUT_DROPPED,
    PUT_FULL,
    PUT_OK,
    RING_F_INDIRECT_DESC,
    NetQueues,
)
from passtd.dataplane.io.vhost_user.virtqueue import (
    BAD_CHAIN,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_INDIRECT,
    NO_CHAIN,
    Virtqueue,
)

KiB = 1024
# gpa [0, 32 KiB) = memfd [0, 32 KiB); gpa [64 KiB, 96 KiB) = memfd [32 KiB, 64 KiB); uva = gpa + UVA
REGIONS = ((0, 32 * KiB, 0), (64 * KiB, 32 * KiB, 32 * KiB))
UVA = 0x10000000
DESC_AT, AVAIL_AT, USED_AT = 64 * KiB, 72 * KiB, 76 * KiB  # ring areas (gpa, region 1)
INDIRECT_AT = 80 * KiB  # where generated indirect tables go
DESC = struct.Struct("<QIHH")


class Guest:
    """The memfd, its two regions as the device maps them, and a writer for the driver's structures."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("ring-fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, 64 * KiB)
        self.table = MemoryTable(
            [map_region(self.fd, gpa, size, gpa + UVA, off) for gpa, size, off in REGIONS]
        )
        self.raw = memoryview(bytearray(0))

    def off(self, gpa: int) -> int:
        for base, size, off in REGIONS:
            if base <= gpa < base + size:
                return off + gpa - base
        raise ValueError(gpa)

    def write(self, gpa: int, data: bytes) -> None:
        os.pwrite(self.fd, data, self.off(gpa))

    def snapshot(self) -> bytes:
        return os.pread(self.fd, 64 * KiB, 0)

    def close(self) -> None:
        self.table.close()
        os.close(self.fd)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    try:
        yield g
    finally:
        g.close()


# Addresses a guest might write: inside either region, at their edges, in the hole, past the end, huge.
addresses = st.one_of(
    st.integers(0, 32 * KiB),
    st.integers(64 * KiB, 96 * KiB),
    st.sampled_from([0, 32 * KiB - 1, 32 * KiB, 48 * KiB, 64 * KiB - 8, 96 * KiB - 1, 96 * KiB, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(st.integers(0, 4 * KiB), st.sampled_from([0, 1, 16, 32 * KiB, 2**31, 2**32 - 1]))
descriptors = st.tuples(addresses, lengths, st.integers(0, 7), st.integers(0, 20))


@st.composite
def valid_descriptor(draw: st.DrawFn, num: int, write: bool) -> tuple[int, int, int, int]:
    """What a well-behaved driver writes: a buffer in region 0, maybe chained to another descriptor."""
    length = draw(st.integers(1, 2 * KiB))
    addr = draw(st.integers(0, 32 * KiB - length))
    flags = (DESC_F_WRITE if write else 0) | draw(st.sampled_from([0, DESC_F_NEXT]))
    return addr, length, flags, draw(st.integers(0, num - 1))


@st.composite
def rings(draw: st.DrawFn, write: bool | None = None) -> dict[str, object]:
    """Either a wholly random ring, or a plausible one (buffers pointing the `write` way) with a few fields
    overwritten by hostile values."""
    num = draw(st.sampled_from([1, 2, 4, 8, 16]))
    last_avail = draw(st.sampled_from([0, 0xFFFF - 1, 0xFFFF]))
    plausible = draw(st.integers(0, 2)) > 0
    if not plausible:
        table = draw(st.lists(descriptors, min_size=num, max_size=num))
        indirect = draw(st.lists(descriptors, max_size=40))
        heads = draw(st.lists(st.integers(0, num + 2), min_size=num, max_size=num))
        avail_idx = draw(st.one_of(st.integers(0, num), st.integers(0, 0xFFFF)))
    else:
        write = draw(st.booleans()) if write is None else write
        table = draw(st.lists(valid_descriptor(num, write), min_size=num, max_size=num))
        indirect = draw(st.lists(valid_descriptor(40, write), max_size=40))
        indirect = [(a, n, f, min(nx, len(indirect) - 1)) for a, n, f, nx in indirect]
        heads = draw(st.permutations(range(num)))
        avail_idx = draw(st.integers(1, num))
        for _ in range(draw(st.integers(0, 2))):
            target = draw(st.sampled_from([table, indirect])) if indirect else table
            i = draw(st.integers(0, len(target) - 1))
            field = draw(st.integers(0, 3))
            entry = list(target[i])
            entry[field] = draw(descriptors)[field]
            target[i] = (entry[0], entry[1], entry[2], entry[3])
    point_indirect = draw(st.lists(st.integers(0, num - 1), max_size=3 if draw(st.booleans()) else 0))
    return {
        "write": write,
        "num": num,
        "table": table,
        "indirect": indirect,
        "heads": list(heads),
        "avail_idx": (avail_idx + last_avail) & 0xFFFF,
        "last_avail": last_avail,
        "point_indirect": point_indirect,
    }


def lay_out(guest: Guest, ring: dict[str, object]) -> Virtqueue:
    num = ring["num"]
    assert isinstance(num, int)
    table = list(ring["table"])  # type: ignore[call-overload]
    indirect = list(ring["indirect"])  # type: ignore[call-overload]
    for i in ring["point_indirect"]:  # type: ignore[attr-defined]
        _, length, flags, nxt = table[i]
        table[i] = (
            INDIRECT_AT,
            16 * max(1, len(indirect)) if length % 2 else length,
            flags | DESC_F_INDIRECT,
            nxt,
        )
    guest.write(DESC_AT, b"".join(DESC.pack(*d) for d in table))
    guest.write(INDIRECT_AT, b"".join(DESC.pack(*d) for d in indirect) or bytes(16))
    heads = ring["heads"]
    assert isinstance(heads, list)
    guest.write(AVAIL_AT, struct.pack(f"<HH{num}H", 0, ring["avail_idx"], *heads))
    guest.write(USED_AT, bytes(4 + 8 * num))
    drops: dict[str, int] = {}
    vq = Virtqueue(0, drops)
    vq.num = num
    vq.desc_uva, vq.avail_uva, vq.used_uva = DESC_AT + UVA, AVAIL_AT + UVA, USED_AT + UVA
    vq.addr_set = True
    assert vq.map(guest.table)
    vq.started = vq.enabled = True
    vq.indirect = True
    vq.last_avail = ring["last_avail"]  # type: ignore[assignment]
    return vq


def in_one_region(guest: Guest, view: memoryview, off: int, length: int) -> bool:
    return any(view is r.view for r in guest.table.regions) and off >= 0 and off + length <= len(view)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ring=rings(), write=st.booleans(), max_len=st.sampled_from([64, 2 * KiB, 1 << 20]))
@example(  # a two-descriptor loop: 0 -> 1 -> 0 ...
    ring={"num": 2, "table": [(0, 8, DESC_F_NEXT, 1), (16, 8, DESC_F_NEXT, 0)], "indirect": [],
          "heads": [0, 1], "avail_idx": 1, "last_avail": 0, "point_indirect": []},
    write=False, max_len=1 << 20,
)  # fmt: skip
@example(  # an indirect table pointing at itself through an indirect descriptor
    ring={"num": 1, "table": [(0, 16, 0, 0)], "indirect": [(INDIRECT_AT, 16, DESC_F_INDIRECT, 0)],
          "heads": [0], "avail_idx": 1, "last_avail": 0, "point_indirect": [0]},
    write=False, max_len=1 << 20,
)  # fmt: skip
def test_walker_never_leaves_the_mapping(
    guest: Guest, ring: dict[str, object], write: bool, max_len: int
) -> None:
    if isinstance(ring.get("write"), bool):
        write = bool(ring["write"])  # a plausible ring: walk it the way its buffers point
    vq = lay_out(guest, ring)
    num = vq.num
    n = vq.available()
    assert 0 <= n <= num
    assert vq.broken == ((int(ring["avail_idx"]) - vq.last_avail) & 0xFFFF > num)  # type: ignore[call-overload]
    segs: list[tuple[memoryview, int, int]] = []
    good = bad = 0
    for _ in range(n):
        before = len(segs)
        head = vq.pop(write, max_len, segs)
        if head == NO_CHAIN:
            assert vq.broken
            break
        if head == BAD_CHAIN:
            bad += 1
            assert len(segs) == before
            continue
        good += 1
        chain = segs[before:]
        assert 0 <= head < num
        assert len(chain) <= num + MAX_INDIRECT  # bounded work per chain
        assert sum(length for _, _, length in chain) <= max_len
        for view, off, length in chain:
            assert length > 0
            assert in_one_region(guest, view, off, length)
        vq.push(head, 0)
    assert sum(vq.drops.values()) == bad + (1 if vq.broken else 0)
    for reason in vq.drops:
        event(reason)
    if good:
        event("good chain")
    vq.publish()
    used_idx = struct.unpack_from("<H", guest.snapshot(), guest.off(USED_AT) + 2)[0]
    assert used_idx == (good + bad) & 0xFFFF


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ring=rings(write=True),
    mergeable=st.booleans(),
    frames=st.lists(st.binary(min_size=14, max_size=3000), min_size=1, max_size=6),
)
def test_receive_writes_only_writable_buffers_and_the_used_ring(
    guest: Guest, ring: dict[str, object], mergeable: bool, frames: list[bytes]
) -> None:
    vq = lay_out(guest, ring)
    net = NetQueues(vq.drops)
    net.rx = vq
    net.set_features(
        1 << F_VERSION_1 | 1 << RING_F_INDIRECT_DESC | (1 << NET_F_MRG_RXBUF if mergeable else 0)
    )
    # Which bytes the device may write: every device-writable range any descriptor names, and the used ring.
    allowed = bytearray(64 * KiB)
    indirect_descs = list(ring["indirect"])  # type: ignore[call-overload]
    for addr, length, flags, _ in [*ring["table"], *indirect_descs]:  # type: ignore[misc]
        if flags & DESC_F_WRITE:
            for base, size, off in REGIONS:
                if base <= addr and addr + length <= base + size:
                    allowed[off + addr - base : off + addr - base + length] = b"\1" * length
    used_off = guest.off(USED_AT)
    allowed[used_off : used_off + 4 + 8 * vq.num] = b"\1" * (4 + 8 * vq.num)
    guest.write(0, b"\xa5" * 32 * KiB)  # region 0 holds only buffers: any write there is visible
    before = guest.snapshot()
    results = [net.put(None, (frame,)) for frame in frames]
    vq.publish()
    after = guest.snapshot()
    assert set(results) <= {PUT_OK, PUT_FULL, PUT_DROPPED}
    event(f"put results {sorted(set(results))}")
    changed = [
        i
        for block in range(0, len(after), 512)
        if after[block : block + 512] != before[block : block + 512]
        for i in range(block, block + 512)
        if after[i] != before[i] and not allowed[i]
    ]
    assert not changed, f"wrote outside writable buffers at memfd offsets {changed[:8]}"


def test_receive_refuses_tso_without_the_guest_feature_and_completes_checksums(guest: Guest) -> None:
    """A guest without GUEST_TSO4 gets no super-segment (counted); one without GUEST_CSUM gets the checksum
    computed here, equal to a full computation."""
    from passtd.dataplane.packets.checksum import checksum, pseudo_header4

    ring = {"num": 4, "table": [(i * 4 * KiB, 4 * KiB, DESC_F_WRITE, 0) for i in range(4)], "indirect": [],
            "heads": [0, 1, 2, 3], "avail_idx": 4, "last_avail": 0, "point_indirect": []}  # fmt: skip
    vq = lay_out(guest, ring)
    net = NetQueues(vq.drops)
    net.rx = vq
    net.set_features(1 << F_VERSION_1 | 1 << NET_F_GUEST_TSO4)  # TSO but no GUEST_CSUM: checksums done here
    src, dst = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 15])
    payload = bytes(range(200))
    tcp = bytearray(struct.pack("!HHIIBBHHH", 80, 1234, 1, 2, 5 << 4, 0x18, 1000, 0, 0)) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, src, dst)
    pseudo = pseudo_header4(src, dst, 6, len(tcp))
    # the dataplane's offload form: the field holds the folded pseudo-header sum, not complemented
    partial = (~checksum(pseudo)) & 0xFFFF
    tcp[16:18] = partial.to_bytes(2, "big")
    eth = bytes(12) + b"\x08\x00"
    vnet = struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 16)
    assert net.put(vnet, (eth + ip, bytes(tcp))) == PUT_OK
    vq.publish()
    mem = guest.snapshot()
    frame = mem[12 : 12 + 14 + len(ip) + len(tcp)]
    got = frame[34 + 16 : 34 + 18]
    tcp[16:18] = b"\0\0"
    assert got == checksum(pseudo, bytes(tcp)).to_bytes(2, "big")
    assert mem[0] == 0  # the header asks for nothing any more
    gso6 = struct.pack("<BBHHHH", 1, 4, 74, 1440, 54, 16)
    assert net.put(gso6, (bytes(3000),)) == PUT_DROPPED
    assert vq.drops == {"vhost.rx_gso_refused": 1}
    net.set_features(1 << F_VERSION_1 | 1 << NET_F_GUEST_CSUM | 1 << NET_F_GUEST_TSO4)
    gso4 = struct.pack("<BBHHHH", 1, 1, 54, 1460, 34, 16)
    assert net.put(gso4, (bytes(3000),)) == PUT_OK


@pytest.mark.parametrize("v6", [False, True])
def test_segment_tcp_cuts_a_super_segment_like_the_kernel(v6: bool) -> None:
    from passtd.dataplane.io.vhost_user.net import segment_tcp
    from passtd.dataplane.packets.checksum import checksum
    from passtd.dataplane.packets.tcp import tcp_checksum_ok

    src, dst = (
        (bytes(15) + b"\1", bytes(15) + b"\2") if v6 else (bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    )
    payload = bytes(range(256)) * 20  # 5120 bytes: 3 full pieces of 1400 and one of 920
    tcp = struct.pack("!HHIIBBHHH", 80, 1234, 0xFFFFFF00, 7, 5 << 4, 0x80 | 0x10 | 0x08 | 0x01, 500, 0, 0)
    if v6:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, src, dst)
    else:
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0xFFFF, 0x4000, 64, 6, 0, src, dst
        )
    eth = bytes(12) + (b"\x86\xdd" if v6 else b"\x08\x00")
    start = 14 + len(ip)
    vnet = struct.pack("<BBHHHH", 1, 4 if v6 else 1, start + 20, 1400, start, 16)
    pieces = segment_tcp(vnet, (eth + ip, tcp, payload))
    assert [len(p) - start - 20 for p in pieces] == [1400, 1400, 1400, 920]
    assert b"".join(bytes(p[start + 20 :]) for p in pieces) == payload
    for i, piece in enumerate(pieces):
        seq, flags = struct.unpack_from("!I", piece, start + 4)[0], piece[start + 13]
        assert seq == (0xFFFFFF00 + 1400 * i) & 0xFFFFFFFF  # wraps around 2**32
        assert flags == (0x80 if i == 0 else 0) | 0x10 | (0x09 if i == 3 else 0)  # CWR first, PSH+FIN last
        assert tcp_checksum_ok(src, dst, memoryview(piece)[start:])
        if v6:
            assert struct.unpack_from("!H", piece, 14 + 4)[0] == len(piece) - start
        else:
            assert struct.unpack_from("!HH", piece, 14 + 2) == (len(piece) - 14, (0xFFFF + i) & 0xFFFF)
            assert checksum(piece[14:start]) == 0
