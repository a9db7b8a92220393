"""The dataplane's single TCP timer under uvloop, whose clock has millisecond steps."""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from passtd.dataplane.io.dataplane import Dataplane
from tests.helpers.tcpfake import CTX


def test_a_timer_that_fires_early_runs_once_not_in_a_spin() -> None:
    """uvloop may fire up to half a millisecond before the deadline; the deadline must still count as reached,
    or the same deadline is armed again and the callback spins until the clock catches up."""

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        dp = Dataplane(CTX, loop)
        fired: list[float] = []
        deadlines = [loop.time() + 0.0103 + i * 0.0001 for i in range(10)]

        class Timed:
            """The real handler with its deadlines replaced (it may be compiled, so not patched in place)."""

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def on_timer(self, now: float) -> None:
                fired.append(now)
                if deadlines and now >= deadlines[0]:
                    deadlines.pop(0)

            def next_deadline(self) -> float:
                return deadlines[0] if deadlines else float("inf")

        real = dp.tcp
        dp.tcp = Timed()  # type: ignore[assignment]
        try:
            dp._after_batch(loop.time())
            for _ in range(100):
                if not deadlines:
                    break
                await asyncio.sleep(0.005)
            return len(fired), len(deadlines)
        finally:
            dp.close()

    fired, left = uvloop.run(main())
    assert left == 0
    assert fired <= 10 + 2  # one callback per deadline (a couple of spare ones at most), not hundreds
