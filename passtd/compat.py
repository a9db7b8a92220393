"""`passt` and `pasta` as drop-in commands: thin aliases of `passtd passt ...` and `passtd pasta ...`.

passtd's options already carry passt(1)'s names, so most of a passt command line passes through unchanged.
What libvirt (src/qemu/qemu_passt.c) passes to passt: `--one-off --socket PATH --mac-addr MAC [--pid FILE]
[--mtu N] [--interface DEV] [--log-file PATH] [--address ADDR [--netmask N]]... [--tcp-ports SPEC]...
[--udp-ports SPEC]...` with SPEC like `all`, `2222:22` or `192.0.2.1%eth0/8080-8090:80-90`; passt
daemonises and libvirt waits for the parent to exit 0 with the socket bound, which `passtd passt` also does.

Only the options whose meaning passtd has under another name, or which are no-ops here, are rewritten:

- `-e`/`--stderr`: passt logs to syslog once detached unless told otherwise; passtd always logs to stderr
  (or `--log-file`), so the option is accepted and dropped.
- `--trace`: passt's extra-verbose level; passtd's most verbose level is `--debug`.

Anything else unknown is rejected by the same one-line error as `passtd` itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final

from passtd.options import main, options_with_values

DROPPED: Final = frozenset({"-e", "--stderr"})
RENAMED: Final = {"--trace": "--debug"}


def translate(argv: Sequence[str], mode: str = "passt") -> list[str]:
    """passt(1)/pasta(1) argv → passtd argv (without the mode).

    Rewriting stops where pasta's PID or command starts (`--` or the first word that is not an option or an
    option's value), so `pasta sh -e` keeps its `-e`.
    """
    takes_value = options_with_values(mode)
    out: list[str] = []
    expect_value = False
    for i, arg in enumerate(argv):
        if expect_value:
            out.append(arg)
            expect_value = False
            continue
        if arg == "--" or (mode == "pasta" and not arg.startswith("-")):
            out.extend(argv[i:])
            break
        if arg in DROPPED:
            continue
        out.append(RENAMED.get(arg, arg))
        expect_value = arg in takes_value
    return out


def passt_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `passt` console script."""
    return main(["passt", *translate(sys.argv[1:] if argv is None else argv, "passt")])


def pasta_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pasta` console script."""
    return main(["pasta", *translate(sys.argv[1:] if argv is None else argv, "pasta")])
