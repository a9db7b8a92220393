"""`passt` and `pasta` as drop-in commands: `passt ARGS` runs `passtd passt ARGS`, likewise `pasta`.

passtd's options carry passt(1)'s names and meaning, including the deprecated no-ops (`-e/--stderr`,
`--no-copy-routes`, `--no-copy-addrs`) and `--trace` (passtd's most verbose level is `--debug`), so a command
line built for upstream passes through unchanged. What each integrator builds (QEMU, libvirt, Podman,
RootlessKit) is listed in the README's drop-in section, with what is supported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from passtd.__main__ import main


def passt_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `passt` console script."""
    return main(["passt", *(sys.argv[1:] if argv is None else argv)])


def pasta_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pasta` console script."""
    return main(["pasta", *(sys.argv[1:] if argv is None else argv)])
