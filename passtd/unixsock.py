"""The one rule for taking a UNIX socket path before bind(): the guest's socket, the control socket, pesto's.

A socket file left by a process that died is removed; a socket something still accepts on, or a file that is
not a socket, is never touched: the start is refused with one line that says which.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from passtd.errors import BackendError
from passtd.limits import SUN_PATH_MAX


def claim_unix_path(path: str, what: str) -> None:
    """Make `path` free for bind() or raise BackendError("{what} {path}: ...")."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise BackendError(f"{what} {path}: path longer than {SUN_PATH_MAX} bytes")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise BackendError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BackendError(f"{what} {path}: no permission to create files in {parent}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BackendError(f"{what} {path}: exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)  # a UNIX connect() completes or fails at once; EAGAIN means a full backlog
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # stale: left behind by a process that died without cleaning up
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            raise BackendError(f"{what} {path}: already in use by another server") from None
        raise BackendError(f"{what} {path}: cannot probe: {exc.strerror}") from None
    else:
        raise BackendError(f"{what} {path}: already in use by another server")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BackendError(f"{what} {path}: cannot remove stale socket: {exc.strerror}") from None
