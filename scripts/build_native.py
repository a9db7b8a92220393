#!/usr/bin/env python3
"""Compile the data path's modules with mypyc, in place, next to their sources.

The sources stay plain, typed Python and remain the reference: without the compiled modules passtd runs the
same code interpreted. mypyc turns attribute access, calls between these modules and integer arithmetic into
C, which is where the flat profile of the per-frame path spends its time (bench/README.md).

The compiled modules are all-or-nothing: they call each other's native classes directly, so a stale one next
to an edited source would run old code against new. The manifest written here records each source's hash;
`passtd.native` checks it at import and, on any difference, loads the whole set from the sources.

    scripts/build_native.py           compile (skipped when the manifest already matches); the compiler's
                                      output is shown only when it fails
    scripts/build_native.py --clean   remove the compiled modules and the manifest
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _load_native() -> ModuleType:
    """passtd/native.py alone: importing the package would run its guard against the build being replaced."""
    spec = importlib.util.spec_from_file_location("passtd_native_list", ROOT / "passtd" / "native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


native = _load_native()


def clean() -> None:
    for path in native.compiled_files(ROOT):
        path.unlink()
    native.manifest_path(ROOT).unlink(missing_ok=True)


def build() -> None:
    from mypyc.build import mypycify
    from setuptools import setup

    sources = [str(ROOT / (m.replace(".", "/") + ".py")) for m in native.MODULES]
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory(prefix="passtd-native-") as tmp:
        extensions = mypycify(sources, opt_level="3", group_name="passtd.native_group", target_dir=tmp)
        setup(
            name="passtd-native",
            ext_modules=extensions,
            script_args=["-q", "build_ext", "--inplace", "--build-temp", tmp],
        )
    shutil.rmtree(ROOT / "build", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules and the manifest")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clean:
        clean()
        return 0
    if args.build_only:
        build()
        return 0
    hashes = native.source_hashes(ROOT)
    manifest = native.manifest_path(ROOT)
    if manifest.exists() and native.compiled_files(ROOT) and manifest.read_text() == hashes:
        return 0
    clean()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, __file__, "--build-only"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        print(f"build_native: mypyc failed ({result.returncode}); NATIVE=0 runs interpreted", file=sys.stderr)
        clean()
        return 1
    native.write_manifest(ROOT, hashes)
    print(f"compiled {len(native.MODULES)} modules with mypyc in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
