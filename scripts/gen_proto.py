#!/usr/bin/env python3
"""Regenerate passtd/control/pb/ from proto/passt.proto; with --check, fail if the committed copy is stale.

The generated modules are committed so that installing passtd needs no protoc. CI runs `--check`, which
regenerates into a temporary directory and compares, so a .proto edit without a regeneration fails the build.

protoc is grpc_tools.protoc from the project's virtualenv; the type stubs come from mypy-protobuf's plugins
(protoc-gen-mypy, protoc-gen-mypy_grpc), found next to that interpreter. protoc is run with `-Iproto`, so the
gRPC module it writes imports its sibling as a top-level `passt_pb2`; that import is rewritten to the package
path, which keeps the generated code importable without touching sys.path.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILES = ("passt.proto",)
OUT_DIR = ROOT / "passtd" / "control" / "pb"
PACKAGE = "passtd.control.pb"
GENERATED = ("passt_pb2.py", "passt_pb2.pyi", "passt_pb2_grpc.py", "passt_pb2_grpc.pyi")
INIT_TEXT = '"""Generated from proto/passt.proto by scripts/gen_proto.py; do not edit."""\n'

# `import passt_pb2 as passt__pb2` (grpc_python_out) and `import passt_pb2 as _passt_pb2` (mypy_grpc_out).
_BARE_IMPORT = re.compile(r"^import (passt_pb2)( as \w+)?$", re.MULTILINE)


def _python() -> Path:
    """The project's virtualenv interpreter when there is one, else the one running this script."""
    venv = ROOT / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def _plugin(python: Path, name: str) -> str:
    """protoc's --plugin argument for a mypy-protobuf plugin installed beside `python`."""
    path = python.parent / name
    if not path.exists():
        raise SystemExit(f"gen_proto: error: {path} not found (install mypy-protobuf into the virtualenv)")
    return f"--plugin={name}={path}"


def generate(out: Path) -> None:
    """Run protoc into `out` and fix the generated imports; `out` must exist."""
    python = _python()
    cmd = [
        str(python),
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR.relative_to(ROOT)}",
        _plugin(python, "protoc-gen-mypy"),
        _plugin(python, "protoc-gen-mypy_grpc"),
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str((PROTO_DIR / name).relative_to(ROOT)) for name in PROTO_FILES),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"gen_proto: error: protoc exited with status {done.returncode}")
    for name in GENERATED:
        path = out / name
        text = path.read_text()
        fixed = _BARE_IMPORT.sub(rf"from {PACKAGE} import \1\2", text)
        if name.startswith("passt_pb2_grpc") and fixed == text:
            raise SystemExit(f"gen_proto: error: no bare passt_pb2 import to rewrite in {name}")
        path.write_text(fixed)
    (out / "__init__.py").write_text(INIT_TEXT)


def check() -> int:
    """Regenerate into a temporary directory; 0 if the committed files match, else 1 with the names."""
    with tempfile.TemporaryDirectory(prefix="gen_proto.") as tmp:
        fresh = Path(tmp)
        generate(fresh)
        stale = [
            name
            for name in ("__init__.py", *GENERATED)
            if not (OUT_DIR / name).exists() or not filecmp.cmp(fresh / name, OUT_DIR / name, shallow=False)
        ]
    if stale:
        rel = OUT_DIR.relative_to(ROOT)
        sys.stderr.write(
            f"gen_proto: {rel} is out of date with proto/: {', '.join(stale)}; run scripts/gen_proto.py\n"
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and exit 1 if the committed files differ",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    generate(OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
