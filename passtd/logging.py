"""structlog set-up: key-value events to stderr (or a file), console or JSON."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


def setup_logging(
    debug: bool = False, quiet: bool = False, fmt: str = "console", stream: TextIO | None = None
) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("passtd").bind(**bound)
