"""sd_notify(3) without libsystemd: datagrams of `KEY=value` lines to $NOTIFY_SOCKET.

The protocol is one AF_UNIX datagram per message; a path starting with '@' names an abstract socket (the '@'
becomes a NUL). With no NOTIFY_SOCKET (not started by systemd with Type=notify) every call is a no-op, so the
daemon calls it unconditionally. A failed send is logged at debug and otherwise ignored: systemd going away
must never take the dataplane down.

The watchdog interval follows sd_watchdog_enabled(3): WATCHDOG_USEC applies only when WATCHDOG_PID is unset or
is our PID, and we ping at half of it, as the man page recommends.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Final

from passtd.logging import get_logger

WATCHDOG_SHARE: Final = 0.5


def notify_address(env: Mapping[str, str]) -> str | bytes | None:
    """The sockaddr for NOTIFY_SOCKET: a path, or bytes with a leading NUL for an abstract name."""
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    if not path.startswith("/"):
        return None  # sd_notify also accepts vsock: addresses; a daemon on the host never gets those
    return path


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is asked for."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner and owner.isdigit() and int(owner) != (os.getpid() if pid is None else pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 * WATCHDOG_SHARE if value > 0 else None


class Notifier:
    """Sends state changes to the service manager; every method is cheap and safe to call without one."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self.address = notify_address(environ)
        self.watchdog = watchdog_interval(environ)
        self.sock: socket.socket | None = None
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.log = get_logger(component="notify")

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *lines: str) -> bool:
        """One datagram with `lines`; True when it was sent."""
        if self.sock is None or self.address is None:
            return False
        try:
            self.sock.sendto("\n".join(lines).encode() + b"\n", self.address)
        except OSError as exc:
            self.log.debug("notify.send.failed", error=exc.strerror, message=lines[0])
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        """systemd >= 253 wants the monotonic time with RELOADING=1; READY=1 follows when done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
