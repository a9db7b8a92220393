"""Which modules `scripts/build_native.py` compiles with mypyc, and the guard against stale builds.

A compiled module next to its source shadows it on import. After an edit without a rebuild, Python would run
the old compiled code; and compiled modules call each other's native classes directly, so one rebuilt module
among old ones is not safe either. `guard()` compares the sources with the manifest written at build time
and, on any difference (or with PASSTD_NATIVE=0), makes every listed module load from its source.

What compiling asks of the listed modules' sources:
- annotations are checked at run time: a fake passed where a class is declared fails, so collaborators a test
  replaces are declared as callables or protocols (demux's TcpSink), or are attributes (TcpHandler.isn);
- compiled classes cannot be patched or subclassed by interpreted code, so every Flow subclass is listed;
- a NamedTuple or dataclass field of a builtin type other than the primitive ones is spelled
  `builtins.memoryview`: mypyc looks a bare builtin name up in the module's globals (python/mypy#20365).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The per-frame path: packet parsing and building, demultiplexing, the protocol cores.
MODULES: tuple[str, ...] = (
    "passtd.dataplane.packets.checksum",
    "passtd.dataplane.packets.ethernet",
    "passtd.dataplane.packets.ipv4",
    "passtd.dataplane.packets.ipv6",
    "passtd.dataplane.packets.tcp",
    "passtd.dataplane.packets.udp",
    "passtd.dataplane.packets.vnet",
    "passtd.dataplane.core.context",
    "passtd.dataplane.core.stats",
    "passtd.dataplane.core.timeouts",
    "passtd.dataplane.core.limits",
    "passtd.dataplane.core.flowtable",
    "passtd.dataplane.core.demux",
    "passtd.dataplane.core.icmp",
    "passtd.dataplane.core.splice",
    "passtd.dataplane.core.udp",
    "passtd.dataplane.io.sockets",
    "passtd.dataplane.io.splice",
    "passtd.dataplane.io.tcp",
    "passtd.dataplane.io.udp",
    "passtd.dataplane.io.echo",
    "passtd.dataplane.io.tap.base",
    "passtd.dataplane.io.tap.tuntap",
    "passtd.dataplane.io.tap.qemu_stream",
    "passtd.dataplane.io.vhost_user.memory",
    "passtd.dataplane.io.vhost_user.virtqueue",
    "passtd.dataplane.io.vhost_user.net",
    "passtd.dataplane.io.timer",
    "passtd.dataplane.io.dataplane",
    "passtd.dataplane.core.tcp.seq",
    "passtd.dataplane.core.tcp.states",
    "passtd.dataplane.core.tcp.conn",
    "passtd.dataplane.core.tcp.rto",
    "passtd.dataplane.core.tcp.window",
    "passtd.dataplane.core.tcp.timers",
    "passtd.dataplane.core.tcp.base",
    "passtd.dataplane.core.tcp.batch",
    "passtd.dataplane.core.tcp.datapath",
    "passtd.dataplane.core.tcp.handshake",
    "passtd.dataplane.core.tcp.handler",
)

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "passtd/native.manifest"

# Set by guard(), which passtd/__init__.py calls: whether the compiled modules are the ones in use, and why.
active = False
status = "interpreted (not checked)"


def manifest_path(root: Path) -> Path:
    return root / MANIFEST


def _source(root: Path, module: str) -> Path:
    return root / (module.replace(".", "/") + ".py")


def compiled_files(root: Path) -> list[Path]:
    """What a build leaves in the tree: one extension per listed module, and the group's shared library."""
    found = []
    for module in MODULES:
        src = _source(root, module)
        found += sorted(src.parent.glob(src.stem + ".*.so"))
    found += sorted((root / "passtd").glob("native_group*.so"))
    return found


def source_hashes(root: Path, modules: Sequence[str] = MODULES) -> str:
    """One line per module with the SHA-256 of its source; the manifest is exactly this text."""
    lines = []
    for module in modules:
        digest = hashlib.sha256(_source(root, module).read_bytes()).hexdigest()
        lines.append(f"{module} {digest}\n")
    return "".join(lines)


def write_manifest(root: Path, text: str) -> None:
    manifest_path(root).write_text(text)


class _SourceOnly:
    """A meta-path finder that loads the listed modules from their .py files, shadowing the compiled ones."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, _source(self.root, fullname))


def guard(root: Path = _PACKAGE_ROOT) -> None:
    """Decide, before any listed module is imported, whether the compiled set may be used."""
    global active, status
    active = False
    if not compiled_files(root):
        status = "interpreted (not compiled)"
        return
    reason = ""
    if os.environ.get("PASSTD_NATIVE", "1") == "0":
        reason = "interpreted (PASSTD_NATIVE=0)"
    else:
        try:
            recorded = manifest_path(root).read_text()
        except OSError:
            recorded = ""
        if recorded != source_hashes(root):
            reason = "interpreted (compiled modules are stale: run `make native`)"
            print(f"passtd: warning: {reason}", file=sys.stderr)
    if reason:
        sys.meta_path.insert(0, _SourceOnly(root))
        status = reason
        return
    active = True
    status = "compiled (mypyc)"
