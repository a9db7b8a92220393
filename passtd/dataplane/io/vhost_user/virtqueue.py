"""Split virtqueues (virtio 1.2 §2.7): walking the guest's descriptor chains, returning them used.

The three areas live in guest memory and the guest may write anything there at any time, so everything read
from them is input to check, once, into locals:
- the available index may run at most `num` entries ahead of ours; further, the ring is garbage and the queue
  is marked broken (virtio §2.7.13.3 lets a device stop using such a queue; the front end resets it);
- a head or `next` index must be below `num`; a chain may hold at most `num` descriptors, which also ends a
  loop (§2.7.5.3.1: the driver MUST NOT build longer chains), and at most `MAX_INDIRECT` in an indirect table;
- an indirect table (§2.7.5.3) needs the negotiated feature, a length that is a non-zero multiple of 16, no
  NEXT flag beside INDIRECT, and no indirect descriptor inside it;
- every buffer must lie wholly inside one memory region (`MemoryTable.gpa_region`), and point the way the
  queue is used (only device-readable on transmit, only device-writable on receive);
- a chain's bytes are bounded by the caller (`max_len`).
A bad chain is counted by reason in `drops` and returned used with length 0, so the guest gets its buffer
back and the queue keeps going. The work per call is bounded by the caller's count of chains.

Ordering: avail entries are read after the avail index, and the used index is written after the used
entries; x86's stores and loads are not reordered with each other, which is all this needs (the only
architecture passtd runs on; another would need fences the language does not offer). The used index is
written with one 2-byte store (`used16`), never with struct.pack_into, which zeroes a field before filling
it: the driver polls that index from another CPU.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Final

from passtd.dataplane.io.vhost_user.memory import MemoryTable

DESC_F_NEXT: Final = 1
DESC_F_WRITE: Final = 2
DESC_F_INDIRECT: Final = 4
AVAIL_F_NO_INTERRUPT: Final = 1
USED_F_NO_NOTIFY: Final = 1
MAX_QUEUE_SIZE: Final = 32768
MAX_INDIRECT: Final = 1024  # descriptors per indirect table; Linux uses at most MAX_SKB_FRAGS + 2
DESC_SIZE: Final = 16

NO_CHAIN: Final = -1  # nothing available (or the queue is broken)
BAD_CHAIN: Final = -2  # one chain was consumed, counted and returned with length 0

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len
_ONE: Final = (1).to_bytes(8, "little")
_EMPTY: Final = memoryview(bytearray(0))
_EMPTY16: Final = _EMPTY.cast("H")


def _ignore(fd: int) -> None:
    pass


def _drop(drops: dict[str, int], reason: str) -> None:
    drops[reason] = drops.get(reason, 0) + 1


class Virtqueue:
    """One split virtqueue, as configured by SET_VRING_NUM/ADDR/BASE/KICK/CALL/ENABLE."""

    def __init__(self, index: int, drops: dict[str, int]) -> None:
        self.index = index
        self.drops = drops
        self.num = 0
        self.desc_uva = 0
        self.avail_uva = 0
        self.used_uva = 0
        self.addr_set = False
        self.desc: memoryview = _EMPTY
        self.avail: memoryview = _EMPTY
        self.used: memoryview = _EMPTY
        self.used16: memoryview = _EMPTY16  # the used ring's flags and index as 16-bit cells (`publish`)
        self.mem = MemoryTable()
        self.last_avail = 0  # our next entry of the avail ring (free-running 16-bit counter)
        self.used_idx = 0  # our next entry of the used ring, published by `publish`
        self.published = 0  # the used index last written to guest memory
        self.quiet = False  # USED_F_NO_NOTIFY is set: the driver need not kick (`set_notify`)
        self.kick_fd = -1
        self.call_fd = -1
        # Called with the kick descriptor before it is closed: whoever polls it must stop first. (An epoll
        # set keeps a closed descriptor's entry while the front end still holds the eventfd, and qemu sends
        # the same eventfd again when it restarts a ring.)
        self.on_kick_close: Callable[[int], None] = _ignore
        self.enabled = False
        self.started = False
        self.broken = False
        self.indirect = False

    # -- configuration -------------------------------------------------------------------------------------

    def map(self, mem: MemoryTable) -> bool:
        """Resolve the ring areas' front-end addresses in `mem`; False (not ready) if any is not mapped."""
        self.mem = mem
        self.desc = self.avail = self.used = _EMPTY
        self.used16 = _EMPTY16
        if not self.addr_set or not self.num:
            return False
        num = self.num
        desc = mem.uva(self.desc_uva, DESC_SIZE * num)
        avail = mem.uva(self.avail_uva, 6 + 2 * num)
        used = mem.uva(self.used_uva, 6 + 8 * num)
        if desc is None or avail is None or used is None:
            return False
        self.desc, self.avail, self.used = desc, avail, used
        self.used16 = used[:4].cast("H")
        return True

    @property
    def mapped(self) -> bool:
        return len(self.used) > 0

    @property
    def ready(self) -> bool:
        return self.started and self.enabled and not self.broken and len(self.used) > 0

    def sync_used_index(self) -> None:
        """Continue from the used index the guest memory holds (a ring (re)started by a new front end)."""
        if self.mapped:
            self.used_idx = self.published = _U16.unpack_from(self.used, 2)[0]

    def set_kick(self, fd: int) -> None:
        """Take over `fd` (or -1: none) as the kick descriptor, closing the one it replaces."""
        old, self.kick_fd = self.kick_fd, fd
        if old >= 0:
            self.on_kick_close(old)
            os.close(old)

    def close_fds(self) -> None:
        self.set_kick(-1)
        if self.call_fd >= 0:
            os.close(self.call_fd)
        self.call_fd = -1

    def reset(self) -> None:
        self.close_fds()
        self.num = 0
        self.addr_set = False
        self.desc = self.avail = self.used = _EMPTY
        self.used16 = _EMPTY16
        self.quiet = False
        self.last_avail = self.used_idx = self.published = 0
        self.enabled = self.started = self.broken = False

    # -- the data path -------------------------------------------------------------------------------------

    def available(self) -> int:
        """Chains the guest made available that we have not taken; a ring running ahead breaks the queue."""
        if not self.ready:
            return 0
        n: int = (_U16.unpack_from(self.avail, 2)[0] - self.last_avail) & 0xFFFF
        if n > self.num:
            _drop(self.drops, "vhost.avail_index")
            self.broken = True
            return 0
        return n

    def pop(self, write: bool, max_len: int, segs: list[tuple[memoryview, int, int]]) -> int:
        """Take the next available chain: append its buffers (region view, offset, length) to `segs` and
        return its head, NO_CHAIN, or BAD_CHAIN (consumed and already returned with length 0; `segs` is
        left as it was). The caller has checked `available()`."""
        num = self.num
        slot = self.last_avail & (num - 1)
        head: int = _U16.unpack_from(self.avail, 4 + 2 * slot)[0]
        if head >= num:
            _drop(self.drops, "vhost.avail_head")
            self.broken = True
            return NO_CHAIN
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        mark = len(segs)
        reason = self._walk(head, write, max_len, segs)
        if reason:
            del segs[mark:]
            _drop(self.drops, reason)
            self.push(head, 0)
            return BAD_CHAIN
        return head

    def _walk(self, head: int, write: bool, max_len: int, segs: list[tuple[memoryview, int, int]]) -> str:
        """Follow one chain into `segs`; the drop reason, or "" for a good chain."""
        num = self.num
        table = self.desc
        table_len = num
        gpa_region = self.mem.gpa_region
        index = head
        count = 0  # descriptors seen in the current table
        total = 0
        indirect = False
        want = DESC_F_WRITE if write else 0
        while True:
            if index >= table_len:
                return "vhost.desc_index"
            count += 1
            if count > table_len:
                return "vhost.chain_loop"
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                if indirect:
                    return "vhost.indirect_nested"
                if not self.indirect or flags & DESC_F_NEXT:
                    return "vhost.indirect_flags"
                if length == 0 or length % DESC_SIZE or length > DESC_SIZE * MAX_INDIRECT:
                    return "vhost.indirect_len"
                view, off = gpa_region(addr, length)
                if off < 0:
                    return "vhost.desc_addr"
                table = view[off : off + length]
                table_len = length // DESC_SIZE
                indirect = True
                index = 0
                count = 0
                continue
            if flags & DESC_F_WRITE != want:
                return "vhost.desc_direction"
            total += length
            if total > max_len:
                return "vhost.chain_len"
            if length:
                view, off = gpa_region(addr, length)
                if off < 0:
                    return "vhost.desc_addr"
                segs.append((view, off, length))
            if not flags & DESC_F_NEXT:
                return ""
            index = nxt

    def push(self, head: int, length: int) -> None:
        """Return a chain as used, `length` bytes written into it; seen by the guest after `publish`."""
        _USED_ELEM.pack_into(self.used, 4 + 8 * (self.used_idx & (self.num - 1)), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def set_notify(self, wanted: bool) -> None:
        """Tell the driver whether to kick after adding chains (§2.7.10, without EVENT_IDX): not while we will
        look at the ring again anyway, which saves a guest a VM exit per batch. One 2-byte store, as the
        index. Whoever clears the flag must read the avail index only after a syscall (a full barrier on
        x86): the driver writes its index, fences, reads the flag, and one of the two must see the other."""
        if wanted == self.quiet and self.mapped:
            self.used16[0] = 0 if wanted else USED_F_NO_NOTIFY
            self.quiet = not wanted

    def allow_kicks(self) -> None:
        """Clear USED_F_NO_NOTIFY whatever we last wrote (a ring starting or stopping)."""
        self.quiet = True
        self.set_notify(True)

    def publish(self) -> None:
        """Make pushed entries visible and interrupt the guest unless it asked not to be (§2.7.10)."""
        if self.used_idx == self.published or not self.mapped:
            return
        # One 2-byte store: struct.pack_into would clear the field first, and a driver reading it on another
        # CPU in between sees the index run backwards (Linux marks the ring broken: "id N is not a head").
        self.used16[1] = self.used_idx
        self.published = self.used_idx
        if self.call_fd >= 0 and not _U16.unpack_from(self.avail, 0)[0] & AVAIL_F_NO_INTERRUPT:
            try:
                os.write(self.call_fd, _ONE)
            except BlockingIOError:
                pass  # the counter is at its maximum: the guest is being interrupted anyway
