"""`passtctl conns top`: flows sorted by throughput, refreshed in place like top(1).

Rates are worked out here, from the byte counters of two successive ListConnections: the daemon keeps no
rate per flow (it would cost the data path), and the counters are exact. A flow seen for the first time
gets its average since it opened. On a terminal the view takes the alternate screen and reads single keys
(`q` quits; Ctrl-C too) without echo, and gives the terminal back as it found it whatever happens. Without a
terminal (a pipe) each refresh is printed after the previous one, for logs.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

from passtctl.render import endpoint, format_bytes, protocol_name, render_columns
from passtd.control.pb import passt_pb2

ALT_SCREEN_ON: Final = "\x1b[?1049h\x1b[?25l"  # alternate screen, cursor hidden
ALT_SCREEN_OFF: Final = "\x1b[?25h\x1b[?1049l"
HOME_CLEAR: Final = "\x1b[H\x1b[2J"
TOP_HEADERS: Final = (
    "ID",
    "PROTO",
    "STATE",
    "GUEST",
    "REMOTE",
    "RATE IN",
    "RATE OUT",
    "FROM GUEST",
    "TO GUEST",
)
_TOP_RIGHT: Final = (0, 5, 6, 7, 8)


@dataclass(frozen=True, slots=True)
class Rate:
    conn: passt_pb2.Connection
    from_guest: float  # bytes per second
    to_guest: float

    @property
    def total(self) -> float:
        return self.from_guest + self.to_guest


def format_rate(per_second: float) -> str:
    return format_bytes(int(per_second)) + "/s"


def rates(
    conns: Iterable[passt_pb2.Connection],
    previous: dict[int, tuple[int, int]],
    elapsed: float,
    now: float,
) -> list[Rate]:
    """Each flow's rate since the previous sample (`previous`: id → byte counters then, updated in place
    to now's), fastest first, ties by id. Flows gone since are dropped from `previous`."""
    out: list[Rate] = []
    seen: dict[int, tuple[int, int]] = {}
    for conn in conns:
        counters = (conn.bytes_from_guest, conn.bytes_to_guest)
        seen[conn.id] = counters
        before = previous.get(conn.id)
        if before is not None and elapsed > 0:
            span = elapsed
            delta = (max(0, counters[0] - before[0]), max(0, counters[1] - before[1]))
        else:  # first sight: the average since it opened
            span = max(now - conn.created_time, 1e-3)
            delta = counters
        out.append(Rate(conn, delta[0] / span, delta[1] / span))
    previous.clear()
    previous.update(seen)
    out.sort(key=lambda r: (-r.total, r.conn.id))
    return out


def render_top(rows: Sequence[Rate], *, width: int, height: int, stamp: float, interval: float) -> str:
    """One screen: a summary line, a blank line, the column table cut to the terminal's height and width."""
    total_in = sum(r.from_guest for r in rows)
    total_out = sum(r.to_guest for r in rows)
    clock = time.strftime("%H:%M:%S", time.localtime(stamp))
    head = (
        f"passtctl conns top - {clock}  {len(rows)} flow{'s' if len(rows) != 1 else ''}  "
        f"in {format_rate(total_in)}  out {format_rate(total_out)}  (every {interval:g} s, q quits)"
    )
    room = max(0, height - 3)  # summary, blank line, header
    if len(rows) > room:
        room = max(0, room - 1)  # and a line saying how many are not shown
    table = render_columns(
        TOP_HEADERS,
        (
            (
                str(r.conn.id),
                protocol_name(r.conn.protocol),
                r.conn.state or "-",
                endpoint(r.conn.guest_address, r.conn.guest_port),
                endpoint(r.conn.remote_address, r.conn.remote_port),
                format_rate(r.from_guest),
                format_rate(r.to_guest),
                format_bytes(r.conn.bytes_from_guest),
                format_bytes(r.conn.bytes_to_guest),
            )
            for r in rows[:room]
        ),
        right=_TOP_RIGHT,
    )
    lines = [head, "", *table.splitlines()]
    if len(rows) > room:
        lines.append(f"... {len(rows) - room} more")
    lines = lines[: max(1, height)]
    return "\n".join(line[:width] for line in lines) + "\n"


class _Keys:
    """Single keys from a terminal: cbreak mode (no echo, no line buffering; Ctrl-C still raises SIGINT),
    restored on exit."""

    def __init__(self, stream: TextIO) -> None:
        self.fd = stream.fileno()
        self._saved: list[Any] | None = None

    def __enter__(self) -> _Keys:
        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def wait(self, timeout: float) -> str:
        """A key pressed within `timeout` seconds, or "" when none was."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return ""
        return os.read(self.fd, 32).decode(errors="replace")


def _size(out: TextIO) -> tuple[int, int]:
    """The terminal's columns and lines now (it may be resized while we run); 80x24 when it says 0x0."""
    try:
        size = os.get_terminal_size(out.fileno())
    except OSError:
        return 80, 24
    return size.columns or 80, size.lines or 24


def run_top(
    fetch: Callable[[], list[passt_pb2.Connection]],
    *,
    interval: float,
    iterations: int | None,
    out: TextIO = sys.stdout,
    keys_from: TextIO = sys.stdin,
) -> int:
    """Refresh until `q`, Ctrl-C or `iterations` screens; returns the exit status (0)."""
    interactive = out.isatty() and keys_from.isatty()
    previous: dict[int, tuple[int, int]] = {}
    last = time.monotonic()
    shown = 0
    keys = _Keys(keys_from) if interactive else None
    if keys is not None:
        keys.__enter__()
        out.write(ALT_SCREEN_ON)
    try:
        while iterations is None or shown < iterations:
            conns = fetch()
            mono = time.monotonic()
            rows = rates(conns, previous, mono - last if shown else 0.0, time.time())
            last = mono
            width, height = _size(out) if interactive else (200, 10_000)
            screen = render_top(rows, width=width, height=height, stamp=time.time(), interval=interval)
            out.write((HOME_CLEAR if interactive else ("\n" if shown else "")) + screen)
            out.flush()
            shown += 1
            if iterations is not None and shown >= iterations:
                break
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                if keys is None:
                    time.sleep(left)
                    break
                if "q" in keys.wait(left).lower():
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if keys is not None:
            out.write(ALT_SCREEN_OFF)
            out.flush()
            keys.__exit__()
    return 0
