"""structlog set-up: key-value events, console or JSON, to stderr or to a size-capped `--log-file`."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Final, TextIO, cast

import structlog

CUT_RATIO: Final = 0.3  # share of the cap freed when the log file is full (passt frees about as much)


class CappedLogFile:
    """A log file that never grows past `cap` bytes: when a line does not fit, the oldest lines are dropped.

    passt(1) `--log-size` semantics: the newest entries matter most when debugging, so old ones are cut from
    the beginning (whole lines, CUT_RATIO of the cap at a time, so the file is not rewritten on every line).
    The file is truncated at start, as passt does, and created mode 0600: logs can name peers and ports.
    """

    def __init__(self, path: str, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.size = 0

    def write(self, text: str) -> int:
        data = text.encode(errors="replace")
        if len(data) > self.cap:  # one giant line: keep its end, it still names the event's context
            data = data[-self.cap :]
        if self.size + len(data) > self.cap:
            self._make_room(len(data))
        os.pwrite(self.fd, data, self.size)
        self.size += len(data)
        return len(text)

    def _make_room(self, need: int) -> None:
        keep = max(0, min(int(self.cap * (1 - CUT_RATIO)), self.cap - need))
        old = os.pread(self.fd, self.size, 0)
        tail = old[len(old) - keep :] if keep else b""
        if tail and len(tail) < len(old) and old[len(old) - keep - 1] != ord("\n"):
            newline = tail.find(b"\n")  # never keep half a line
            tail = tail[newline + 1 :] if newline >= 0 else b""
        os.pwrite(self.fd, tail, 0)
        os.ftruncate(self.fd, len(tail))
        self.size = len(tail)

    def flush(self) -> None:
        """Every write is already a syscall; nothing is buffered."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_open_file: CappedLogFile | None = None


def setup_logging(
    debug: bool = False,
    quiet: bool = False,
    fmt: str = "console",
    stream: TextIO | None = None,
    log_file: str | None = None,
    log_size: int = 1024 * 1024,
    errors_only: bool = False,
) -> None:
    """Configure structlog; `log_file` (opened here, OSError on failure) replaces stderr. `errors_only`
    keeps a terminal someone is typing into clean (interactive pasta) unless debug was asked for."""
    global _open_file
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    if errors_only and not debug:
        level = logging.ERROR
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    factory: Any
    if log_file is not None:
        capped = CappedLogFile(log_file, log_size)
        if _open_file is not None:
            _open_file.close()
        _open_file = capped
        factory = structlog.WriteLoggerFactory(cast(TextIO, capped))  # one write per line: cut at lines
    else:
        factory = structlog.PrintLoggerFactory(stream or sys.stderr)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


def debug_enabled() -> bool:
    """True when debug lines are written: callers skip building what only a debug line would show."""
    return bool(structlog.get_config()["wrapper_class"](None, [], {}).is_enabled_for(logging.DEBUG))


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("passtd").bind(**bound)
