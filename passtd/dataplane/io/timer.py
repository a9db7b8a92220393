"""One event-loop timer for the earliest of many deadlines (the TCP core keeps its own heap of them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class DeadlineTimer:
    """Armed for the earliest deadline asked for; re-arming later is a no-op, earlier replaces the handle.

    uvloop keeps time in whole milliseconds and fires up to half of one early. Taking loop.time() as is on
    firing, nothing would be due yet, the owner would arm the same deadline again and the loop would spin
    until the clock caught up; so `fire` gets the later of the clock and the deadline it was armed for.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[float], None]) -> None:
        self.loop = loop
        self.fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at = float("inf")

    def arm(self, deadline: float) -> None:
        if deadline < self._at:
            if self._handle is not None:
                self._handle.cancel()
            self._at = deadline
            self._handle = self.loop.call_at(deadline, self._fired)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._at = float("inf")

    def _fired(self) -> None:
        due = self._at
        self._handle = None
        self._at = float("inf")
        self.fire(max(self.loop.time(), due))
