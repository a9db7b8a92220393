"""passtctl: query a running passtd over its control socket.

Exit status: 0 success, 1 the call failed (or `health` is not SERVING), 2 bad usage. Errors are one line on
stderr, `passtctl: error: ...`, so that scripts can log them as they are.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from passtctl.client import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    ControlClient,
    ControlError,
    socket_path,
)
from passtctl.render import render_json, render_status_table
from passtd import __version__

PROG = "passtctl"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _address(text: str) -> str:
    try:
        return socket_path(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    default = os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    parser = _Parser(prog=PROG, description="Query a running passtd over its control socket.")
    parser.add_argument(
        "-c",
        "--control",
        metavar="ADDR",
        type=_address,
        default=default,
        help=f"control socket, PATH or unix:PATH (default: ${ADDRESS_ENV}, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"give up on a call after this long (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    status = commands.add_parser("status", help="show the daemon's state, configuration and counters")
    status.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table for people (default), json (proto3 JSON mapping) for scripts",
    )
    status.set_defaults(run=_status)

    health = commands.add_parser(
        "health", help="print the health status; exit 0 only when SERVING", description="Exit 0 if SERVING."
    )
    health.add_argument(
        "--service", default="", metavar="NAME", help='service to check (default: "", the whole server)'
    )
    health.set_defaults(run=_health)
    return parser


def _status(client: ControlClient, args: argparse.Namespace) -> int:
    status = client.status()
    sys.stdout.write(render_json(status) if args.output == "json" else render_status_table(status))
    return EXIT_OK


def _health(client: ControlClient, args: argparse.Namespace) -> int:
    name = client.health(args.service)
    sys.stdout.write(name + "\n")
    return EXIT_OK if name == "SERVING" else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; keep main() returning a status
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[ControlClient, argparse.Namespace], int] = args.run
    try:
        with ControlClient(args.control, timeout=args.timeout) as client:
            return run(client, args)
    except ControlError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_FAILED
    except BrokenPipeError:  # `passtctl status | head -1`: the reader left, which is not our error
        sys.stderr.close()
        return EXIT_FAILED
