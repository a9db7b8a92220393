"""The process's descriptor limit: raised at start, measured, shared out (core/limits.py), and a spare.

Descriptor exhaustion is an ordinary event here, not a bug: every socket-creating call site checks
`is_fd_exhausted`, counts `fd.exhausted` and refuses the one flow instead of letting an
`OSError: Too many open files` escape. `SpareFd` is the classic answer to EMFILE on accept(): a listening
socket with a pending connection stays readable, so without shedding the connection the loop would spin.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from typing import Final

from passtd.dataplane.core.limits import FdPool, plan_fd_pool
from passtd.dataplane.io.sockets import reset_socket

FD_EXHAUSTED: Final = frozenset((errno.EMFILE, errno.ENFILE))


def raise_nofile_limit() -> int:
    """Forwarding many ports needs many descriptors: take the soft limit up to the hard one, as passt does.
    Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def open_fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64  # no /proc: assume a typical interpreter's count


def fd_pool() -> FdPool:
    """Raise the limit, then share out what is left after the descriptors already open."""
    return plan_fd_pool(raise_nofile_limit(), open_fd_count())


def follow_limit(pool: FdPool) -> bool:
    """Re-share the pool when RLIMIT_NOFILE was changed from outside (one getrlimit, from the periodic
    tick); True when it had changed."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft == pool.open_files:
        return False
    pool.replan(soft)
    return True


def is_fd_exhausted(exc: OSError) -> bool:
    return exc.errno in FD_EXHAUSTED


class SpareFd:
    """One descriptor held in reserve so that an accept() at EMFILE can still take the pending connection
    off the queue and reset it."""

    def __init__(self) -> None:
        self._fd = self._open()

    @staticmethod
    def _open() -> int:
        try:
            return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def shed(self, listener: socket.socket) -> bool:
        """Free the spare, accept one pending connection and reset it, take the spare again. True when a
        connection was shed (the caller counts it); False when even that failed."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        shed = False
        try:
            conn, _ = listener.accept()
        except OSError:
            pass
        else:
            reset_socket(conn)
            shed = True
        self._fd = self._open()
        return shed

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
