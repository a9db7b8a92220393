"""Entry point of `passtd`, `passt`, `pasta` and `python -m passtd`: parse, bind the guest socket, then run.

The order is for start-up time: the command line is parsed with light modules only, the passt socket is bound
and listening next (qemu may connect a few milliseconds after it is started), and only then are the slow
modules loaded: the host's defaults over netlink, the data path, uvloop, gRPC. The daemon gets a re-parse
callable for SIGHUP, so it never imports the option layer and the option layer never imports the daemon.

No traceback reaches the user: a bad option is one line and exit 2, a start-up failure one line and exit 1,
and anything unexpected one line naming the exception, exit 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from passtd.errors import BackendError, ConfigError
from passtd.limits import socket_path_problem

if TYPE_CHECKING:
    from passtd.config import Config
    from passtd.dataplane.io.guestsock import GuestListener
    from passtd.dataplane.io.hostview import HostView
    from passtd.options import Parsed

PROG: Final = "passtd"


def _say(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {' '.join(message.split())}\n")


def reparse(argv: Sequence[str], host: HostView | None) -> Config:
    """SIGHUP: the same command line (and its --config file) parsed again against the host seen at start."""
    from passtd.options import parse

    return parse(argv).resolve(host)


def _bind_early(parsed: Parsed) -> GuestListener | None:
    """passt with a socket path: bind it now, before the slow imports (see the module docstring)."""
    ns = parsed.ns
    if ns.mode != "passt" or getattr(ns, "fd", None) is not None or getattr(ns, "vhost_user", False):
        return None
    if ns.socket is None:
        return None  # the default path is in our runtime directory, created by the daemon
    if socket_path_problem(ns.socket) is not None:
        return None  # resolve() names the problem
    from passtd.dataplane.io.guestsock import GuestListener

    return GuestListener(ns.socket)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, then hand over to the daemon; returns the exit code."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: one line, never a traceback
        _say(f"internal error: {type(exc).__name__}: {exc}")
        return 1


def _main(argv: Sequence[str]) -> int:
    try:
        from passtd.options import parse

        parsed = parse(argv)
    except ConfigError as exc:
        _say(str(exc))
        return 2
    except SystemExit as exc:  # --help / --version / --print-capabilities, already printed
        return exc.code if isinstance(exc.code, int) else 0
    listener = None
    try:
        listener = _bind_early(parsed)
        config = parsed.resolve()
    except ConfigError as exc:
        if listener is not None:
            listener.close()
        _say(str(exc))
        return 2
    except BackendError as exc:
        _say(str(exc))
        return 1
    from passtd.daemon import run  # the slow imports start here, with the socket already listening

    return run(config, reparse, listener)


if __name__ == "__main__":
    raise SystemExit(main())
