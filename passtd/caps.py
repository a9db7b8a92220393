"""Changing user with --runas while keeping the few capabilities pasta still needs (passt's isolation.c).

setuid() away from 0 clears every capability. passt mode needs none afterwards. pasta mode does: entering
the namespace later (the `auto` port scan, -T/-U listeners made on a policy change) needs CAP_SYS_ADMIN,
and binding a low port there or on the host after a policy change needs CAP_NET_BIND_SERVICE. So pasta
keeps exactly those two in its effective and permitted sets, as upstream's isolate_prefork() does; the
bounding and inheritable sets are emptied either way, so nothing the process could ever run gains more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Final

CAP_NET_BIND_SERVICE: Final = 10
CAP_SYS_ADMIN: Final = 21
PASTA_KEEPS: Final = frozenset((CAP_SYS_ADMIN, CAP_NET_BIND_SERVICE))

_PR_CAPBSET_DROP: Final = 24
_PR_SET_KEEPCAPS: Final = 8
_CAP_VERSION_3: Final = 0x20080522
_CAP_LAST_POSSIBLE: Final = 63


class _Header(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _Data(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _set_caps(libc: ctypes.CDLL, keep: frozenset[int]) -> None:
    """Effective and permitted sets = `keep`, inheritable empty (for the calling thread, and the threads it
    starts from now on)."""
    header = _Header(_CAP_VERSION_3, 0)
    data = (_Data * 2)()
    for cap in keep:
        word, bit = divmod(cap, 32)
        data[word].effective |= 1 << bit
        data[word].permitted |= 1 << bit
    _check(libc.capset(ctypes.byref(header), data), "capset")


def change_user(uid: int, gid: int, keep: frozenset[int] = frozenset()) -> None:
    """Become uid:gid with no supplementary group, keeping the capabilities in `keep` and no other.

    Called as root from the main thread once every socket and file is open; raises OSError when the change
    is refused. Threads started before keep their user change (glibc applies it to all) but not `keep`.
    """
    libc = _libc()
    for cap in range(_CAP_LAST_POSSIBLE + 1):  # EINVAL past the kernel's last capability: stop
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break
    if keep:
        _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if keep:
        _check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
        _set_caps(libc, keep)
