"""The guest's memory as the front end shares it: SET_MEM_TABLE regions, each a descriptor we map.

A region says: guest-physical addresses [gpa, gpa + size) are the front end's user addresses
[uva, uva + size), and are bytes [mmap_offset, mmap_offset + size) of the descriptor sent with the message.
Descriptors in the rings carry guest-physical addresses; SET_VRING_ADDR carries user addresses. Both are
translated here, and only ever into a view of one region's mapping: a range that is not wholly inside one
region (out of the table, straddling two regions, wrapping around 2**64) translates to None, so no address a
guest writes can make us touch memory outside what was shared with us.

The mapping must not shrink under us (a truncated memfd turns an access into SIGBUS): qemu seals its memfds
against shrinking; a descriptor that is not sealed gets the seal added here when the file allows it, and a
file smaller than the region is refused.
"""

from __future__ import annotations

import builtins
import fcntl
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Final

from passtd.dataplane.io.vhost_user.protocol import VhostUserError

_F_SEAL_SHRINK: Final = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
_F_ADD_SEALS: Final = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_GET_SEALS: Final = getattr(fcntl, "F_GET_SEALS", 1034)
_U64: Final = 1 << 64


@dataclass(slots=True)
class Region:
    gpa: int
    size: int
    uva: int
    view: builtins.memoryview  # exactly the region's `size` bytes (builtins.: python/mypy#20365)
    mm: mmap.mmap | None  # None for a region built over a caller's buffer (tests)


def _seal_against_shrinking(fd: int) -> None:
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        return  # not a memfd (hugetlbfs, a plain file): nothing to ask
    if not seals & _F_SEAL_SHRINK:
        try:
            fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK)
        except OSError:
            pass  # F_SEAL_SEAL set by the owner: its promise is what we have


def map_region(fd: int, gpa: int, size: int, uva: int, mmap_offset: int) -> Region:
    """Map one region from its descriptor (not closed here). VhostUserError when it cannot be what it says."""
    if size <= 0 or gpa + size > _U64 or uva + size > _U64:
        raise VhostUserError(f"memory region of size {size} at {gpa:#x}")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise VhostUserError(f"memory region descriptor: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode) and st.st_size < mmap_offset + size:
        raise VhostUserError(
            f"memory region of {size} bytes at offset {mmap_offset} in a {st.st_size}-byte file"
        )
    _seal_against_shrinking(fd)
    try:
        # The offset is not necessarily page-aligned: map from 0 and slice.
        mm = mmap.mmap(fd, mmap_offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as exc:
        raise VhostUserError(f"cannot map memory region: {exc}") from None
    return Region(gpa, size, uva, memoryview(mm)[mmap_offset : mmap_offset + size], mm)


class MemoryTable:
    """Translation of guest-physical and front-end user ranges into views of the mapped regions."""

    def __init__(self, regions: list[Region] | None = None) -> None:
        self.regions: list[Region] = regions or []

    def gpa(self, addr: int, length: int) -> memoryview | None:
        """The `length` bytes at guest-physical `addr`, or None unless wholly inside one region."""
        if length < 0:
            return None
        for region in self.regions:
            off = addr - region.gpa
            if off >= 0 and off + length <= region.size:
                return region.view[off : off + length]
        return None

    def gpa_region(self, addr: int, length: int) -> tuple[memoryview, int]:
        """The region view and offset of [addr, addr + length); (empty view, -1) when not inside one region.
        The data path's variant: no slice is made, the caller copies with offsets."""
        if length >= 0:
            for region in self.regions:
                off = addr - region.gpa
                if off >= 0 and off + length <= region.size:
                    return region.view, off
        return _EMPTY, -1

    def uva(self, addr: int, length: int) -> memoryview | None:
        """The `length` bytes at the front end's user address `addr`, or None unless inside one region."""
        if length < 0:
            return None
        for region in self.regions:
            off = addr - region.uva
            if off >= 0 and off + length <= region.size:
                return region.view[off : off + length]
        return None

    def close(self) -> None:
        """Unmap every region. A view still held elsewhere keeps its mapping alive until it is released."""
        regions, self.regions = self.regions, []
        for region in regions:
            region.view.release()
            if region.mm is not None:
                try:
                    region.mm.close()
                except BufferError:
                    pass  # exported views remain; the mapping goes with the last of them


_EMPTY: Final = memoryview(b"")
