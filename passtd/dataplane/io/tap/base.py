"""The interface every tap back-end offers to the dataplane.

Semantics (all calls are non-blocking and made from the event loop thread):

- `fileno()` is the descriptor to watch for readability; it may change when a passt-mode guest reconnects,
  which is why the dataplane asks again after `recv_batch` reports a disconnect.
- `recv_batch(limit)` returns up to `limit` complete Ethernet frames that are ready now, possibly none.
  Returned buffers are valid only until the next call (they may be views of a reused buffer).
  It raises `EOFError` when the guest went away.
- `send_batch(frames)` writes whole frames; a frame that cannot be written without blocking is dropped and
  counted in `dropped_tx` (the guest's TCP or the flow logic retransmits), never buffered without bound.
  On a tap with a virtio-net header, an entry may be a tuple (header, frame parts...); a plain frame gets
  a header that asks for nothing.
- `close()` releases every descriptor; calling it twice is harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias

OutFrame: TypeAlias = bytes | bytearray | memoryview | tuple[bytes | memoryview, ...]


class TapBackend(Protocol):
    dropped_tx: int
    on_drained: Callable[[], None]  # called once written-but-queued frames have all left (see `backlog`)

    @property
    def backlog(self) -> int:
        """Bytes accepted by `send_batch` but not yet handed to the kernel (0 for a tap that never queues)."""
        ...

    def fileno(self) -> int: ...

    def recv_batch(self, limit: int) -> list[memoryview]: ...

    def send_batch(self, frames: Sequence[OutFrame]) -> None: ...

    def close(self) -> None: ...
