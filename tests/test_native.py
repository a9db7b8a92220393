"""The compiled data path (scripts/build_native.py) is the one in use, and a stale build never is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import passtd.dataplane  # noqa: F401  (importing the data path runs native.guard())
from passtd import native

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import passtd.dataplane.core.tcp.handler as m, passtd.native as n\nprint(n.status)\nprint(m.__file__)\n"
)


def probe(root: Path, **env: str) -> list[str]:
    """Import a compiled module in a fresh interpreter rooted at `root`; its status and where it came from."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [*done.stdout.split("\n")[:2], done.stderr]


def test_make_test_runs_the_compiled_modules() -> None:
    """`make test` builds them first (NATIVE=1, the default), so a silent fallback to the sources would hide
    a broken build: the suite must then have run interpreted, and this says so."""
    if os.environ.get("PASSTD_NATIVE") == "0" or not native.compiled_files(ROOT):
        pytest.skip("interpreted on purpose (PASSTD_NATIVE=0 or NATIVE=0)")
    assert native.active, native.status
    status, origin, _ = probe(ROOT)
    assert status == "compiled (mypyc)" and origin.endswith(".so")


def test_passtd_native_0_loads_every_module_from_source() -> None:
    if not native.compiled_files(ROOT):
        pytest.skip("nothing compiled")
    status, origin, _ = probe(ROOT, PASSTD_NATIVE="0")
    assert status == "interpreted (PASSTD_NATIVE=0)" and origin.endswith("handler.py")


def test_a_source_edited_after_the_build_makes_the_whole_set_interpreted(tmp_path: Path) -> None:
    """The guard on a copy of the tree whose handler source differs from the manifest: every listed module
    then loads from its source, with one warning, instead of old compiled code running against new."""
    if not native.compiled_files(ROOT):
        pytest.skip("nothing compiled")
    copy = tmp_path / "tree"
    copy.mkdir()
    subprocess.run(["cp", "-a", str(ROOT / "passtd"), str(copy)], check=True, timeout=60)
    handler = copy / "passtd/dataplane/core/tcp/handler.py"
    handler.write_text(handler.read_text() + "\n# edited after the build\n")
    status, origin, stderr = probe(copy)
    assert status.startswith("interpreted (compiled modules are stale")
    assert origin == str(handler)
    assert stderr.count("warning") == 1
