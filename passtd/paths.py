"""Where passtd's sockets are by default, and where an instance's control socket is found again.

Import-light (no imports beyond typing): passtctl uses the same rules to find a daemon's control socket from
its PID file or guest socket, and must not load the data path to do so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

SOCKET_DIR: Final = "passtd"
SOCKET_NAME: Final = "passtd.socket"
CONTROL_NAME: Final = "passtd.control"


def runtime_dir(env: Mapping[str, str]) -> str:
    """passtd's own runtime directory: under $XDG_RUNTIME_DIR for an ordinary user (systemd --user, logind),
    else the system one; the only directory passtd creates itself."""
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return f"{runtime.rstrip('/')}/{SOCKET_DIR}"
    return f"/run/{SOCKET_DIR}"


def default_socket_path(env: Mapping[str, str]) -> str:
    """The passt socket when -s is not given, in passtd's runtime directory."""
    return f"{runtime_dir(env)}/{SOCKET_NAME}"


def default_control_address(env: Mapping[str, str]) -> str:
    """The control socket of a passt instance started with default paths (passtctl's default)."""
    return f"{runtime_dir(env)}/{CONTROL_NAME}"


def derived_control_path(socket_path: str | None, pid_file: str | None) -> str | None:
    """Where the control socket of an instance started as passt/pasta is, found again from what the caller
    knows: NAME.socket → NAME.control next to the guest socket, else FILE.pid → FILE.control next to the PID
    file (qemu's --fd has no socket path). `passtctl --pid FILE` / `--socket PATH` use the same rule."""
    for path, suffix in ((socket_path, ".socket"), (pid_file, ".pid")):
        if path:
            return f"{path.removesuffix(suffix)}.control"
    return None


def default_control_path(
    mode: str, socket_path: str | None, env: Mapping[str, str], pid: int, pid_file: str | None = None
) -> str:
    """Derived from the guest socket or the PID file; else one per process in the runtime directory."""
    derived = derived_control_path(socket_path, pid_file)
    if derived is not None:
        return derived
    return f"{runtime_dir(env)}/{mode}-{pid}.control"
