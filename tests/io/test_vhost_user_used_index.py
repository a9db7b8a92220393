"""The used index as a driver on another CPU sees it: only values the device wrote, never a half-written one.

The driver polls the used ring's index while the device writes it. `struct.pack_into` clears a field before
filling it, so an index written that way is 0 for an instant, and a driver that reads it then sees the ring
run backwards by thousands of entries (Linux marks the queue broken; the bench's front end handed the same
buffer out twice and the transfer stalled). The test runs the device's `publish` in a child process on one
CPU, with indexes that are never 0, and reads the index through a second mapping of the memfd on another, as
a guest would: a 0 can only be a torn write.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

import pytest

from passtd.dataplane.io.vhost_user.memory import MemoryTable, map_region
from passtd.dataplane.io.vhost_user.virtqueue import Virtqueue

SIZE = 64 * 1024
NUM = 256
DESC_AT, AVAIL_AT, USED_AT = 0, 8 * 1024, 16 * 1024
UVA = 0x7F0000000000
U16 = struct.Struct("<H")
SECONDS = 0.5


def started_queue(fd: int) -> Virtqueue:
    """A transmit queue mapped over the memfd and started, as the device leaves it after set-up."""
    vq = Virtqueue(1, {})
    vq.num = NUM
    vq.desc_uva, vq.avail_uva, vq.used_uva = UVA + DESC_AT, UVA + AVAIL_AT, UVA + USED_AT
    vq.addr_set = True
    assert vq.map(MemoryTable([map_region(fd, 0, SIZE, UVA, 0)]))
    vq.started = vq.enabled = True
    return vq


def test_publish_writes_the_index_and_nothing_else() -> None:
    fd = os.memfd_create("used-index", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SIZE)
        vq = started_queue(fd)
        driver = mmap.mmap(fd, SIZE)
        driver[USED_AT : USED_AT + 2] = b"\x01\x00"  # the ring's flags (VRING_USED_F_NO_NOTIFY) stay
        for i in range(3 * 0x10000 // 2):  # wraps the 16-bit index
            vq.push(i % NUM, 0)
            vq.publish()
            assert U16.unpack_from(driver, USED_AT + 2)[0] == (i + 1) & 0xFFFF
        assert driver[USED_AT : USED_AT + 2] == b"\x01\x00"
        driver.close()
    finally:
        os.close(fd)


def test_used_index_is_never_read_half_written_on_another_cpu() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: the device and the driver run at the same time")
    fd = os.memfd_create("used-index", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    driver = mmap.mmap(fd, SIZE)
    pid = os.fork()
    if pid == 0:  # the device: push and publish as fast as it can, for a bounded time
        code = 1
        try:
            os.sched_setaffinity(0, {cpus[0]})
            vq = started_queue(fd)
            end = time.monotonic() + SECONDS
            i = 0
            while time.monotonic() < end:
                for _ in range(1000):
                    vq.push(i % NUM, 0)
                    vq.publish()
                    i += 1
                    if vq.used_idx == 0xFFFF:  # wrap from 0xFFFF to 1: 0 is never written
                        vq.used_idx = 0
                        vq.push(0, 0)
            code = 0
        finally:
            os._exit(code)
    try:
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpus[1]})
        reads = torn = 0
        last = 0
        end = time.monotonic() + SECONDS
        try:
            while time.monotonic() < end:
                for _ in range(1000):
                    idx = U16.unpack_from(driver, USED_AT + 2)[0]
                    if idx == 0 and last != 0:  # 0 is never published: a field cleared before its write
                        torn += 1
                    last = idx if idx else last
                    reads += 1
        finally:
            os.sched_setaffinity(0, affinity)
    finally:
        _, status = os.waitpid(pid, 0)
        driver.close()
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert last != 0 and reads > 10_000
    assert torn == 0, f"the driver read a half-written used index {torn} times in {reads} reads"
