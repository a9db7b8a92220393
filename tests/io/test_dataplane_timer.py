"""The dataplane's single TCP timer under uvloop, whose clock has millisecond steps."""

from __future__ import annotations

import asyncio

import uvloop

from passtd.dataplane.io.timer import DeadlineTimer


def test_a_timer_that_fires_early_runs_once_not_in_a_spin() -> None:
    """uvloop may fire up to half a millisecond before the deadline; the deadline must still count as reached,
    or the owner arms the same deadline again and the callback spins until the clock catches up. The owner
    here behaves like the dataplane: on each firing it handles what is due and re-arms for what is left."""

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        deadlines = [loop.time() + 0.0103 + i * 0.0001 for i in range(10)]

        def on_timer(now: float) -> None:
            fired.append(now)
            while deadlines and now >= deadlines[0]:
                deadlines.pop(0)
            timer.arm(deadlines[0] if deadlines else float("inf"))

        timer = DeadlineTimer(loop, on_timer)
        timer.arm(deadlines[0])
        try:
            for _ in range(100):
                if not deadlines:
                    break
                await asyncio.sleep(0.005)
            return len(fired), len(deadlines)
        finally:
            timer.cancel()

    fired, left = uvloop.run(main())
    assert left == 0
    assert fired <= 10 + 2  # one callback per deadline (a couple of spare ones at most), not hundreds


def test_arming_later_keeps_the_earlier_deadline_and_cancel_disarms() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        timer = DeadlineTimer(loop, fired.append)
        soon = loop.time() + 0.01
        timer.arm(soon)
        timer.arm(soon + 10)  # later: no effect
        await asyncio.sleep(0.05)
        timer.arm(loop.time() + 0.01)
        timer.cancel()
        await asyncio.sleep(0.03)
        return [now - soon for now in fired]

    late = uvloop.run(main())
    assert len(late) == 1 and late[0] >= 0
