"""The guest's UNIX socket in passt mode, bound as early as the process can.

Light on purpose (no asyncio, no netlink): the entry point binds the socket qemu connects to right after the
command line is parsed, before the slow imports (uvloop, pyroute2, grpc), because some libvirt versions start
qemu a few milliseconds after passt and qemu connects once. A listening socket queues connections until the
loop accepts them.
"""

from __future__ import annotations

import os
import socket

from passtd.errors import BackendError
from passtd.unixsock import claim_unix_path


class GuestListener:
    """A bound, listening UNIX socket and the path to remove when done."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = bind_unix_listener(path)

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        return conn

    def close(self) -> None:
        """Close and unlink; a path we may no longer remove (after --runas) is left, as passt leaves it."""
        if self.sock.fileno() < 0:
            return
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def adopt_stream_socket(fd: int) -> socket.socket:
    """--fd: the connected stream socket a parent (qemu -netdev passt) handed over; refused if not one."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BackendError(f"--fd {fd}: not an open socket ({exc.strerror})") from None
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise BackendError(f"--fd {fd}: not a stream socket")
    os.set_inheritable(fd, False)  # ours now: not for a command pasta would run
    return sock


def bind_unix_listener(path: str, mode: int = 0o600) -> socket.socket:
    """Bind a listening UNIX socket, removing a stale file but never a socket someone still listens on."""
    claim_unix_path(path, "--socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise BackendError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(1)
    sock.setblocking(False)
    return sock
