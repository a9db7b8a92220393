"""Kernel limits and name rules that several layers check: one home, so options, io and core agree.

Pure (no imports beyond typing): the option parser, the pure core and the io layer all read it.
"""

from __future__ import annotations

from typing import Final

IFNAMSIZ: Final = 16  # <linux/if.h>, including the terminating NUL
SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL on Linux
MTU_MIN: Final = 68  # RFC 791: every IPv4 host must handle 68-byte datagrams
MTU_MAX: Final = 65520  # passt's default and largest: 64 KiB minus room for headers
MTU_DEFAULT: Final = 65520
IPV6_MIN_MTU: Final = 1280  # RFC 8200 section 5; below it IPv6 is disabled
LOG_SIZE_DEFAULT: Final = 1024 * 1024  # passt(1): --log-size defaults to 1 MiB
LOG_SIZE_MIN: Final = 4096  # room for a few lines after trimming
# Linux's dev_valid_name() refuses '/', ':' and whitespace; '%' is how passt writes ADDR%IFNAME and ','
# separates port specs, so a name with either could not be given back on a command line.
IFNAME_FORBIDDEN: Final = frozenset("/%:,")


def socket_path_problem(path: str) -> str | None:
    """Why `path` cannot name a UNIX socket, or None (the length counts bytes, as the kernel does)."""
    if not path or "\0" in path:
        return "expects a path"
    if len(path.encode(errors="surrogateescape")) > SUN_PATH_MAX:
        return f"{path!r} is longer than {SUN_PATH_MAX} bytes"
    return None


def ifname_problem(name: str) -> str | None:
    """Why `name` cannot be a network interface name, or None when Linux and our option syntax accept it."""
    if not name:
        return "empty"
    if len(name.encode()) >= IFNAMSIZ:
        return f"at most {IFNAMSIZ - 1} characters"
    if not name.isascii() or not name.isprintable() or name in (".", ".."):
        return "not a valid interface name"
    if any(c in IFNAME_FORBIDDEN or c.isspace() for c in name):
        return "contains one of '/%:,' or a blank"
    return None
