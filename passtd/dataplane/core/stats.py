"""Counters kept as plain ints and dicts: cheap on the hot path, read by the control plane."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Stats:
    frames_from_tap: int = 0
    bytes_from_tap: int = 0
    frames_to_tap: int = 0
    bytes_to_tap: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count
    handled: Counter[str] = field(default_factory=Counter)  # service -> count
    limits: dict[str, int] = field(default_factory=dict)  # name -> configured cap (what drops count against)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1
