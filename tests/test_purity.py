"""The functional core imports no I/O: checked on the import graph, not just by convention."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "passtd" / "dataplane"
BANNED = {"asyncio", "socket", "os", "time", "structlog", "pyroute2", "select", "subprocess", "threading"}
PURE_FILES = sorted([*(ROOT / "packets").rglob("*.py"), *(ROOT / "core").rglob("*.py")])


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_imports(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
            if node.module.startswith("passtd.") and ".io" in node.module:
                imported.add(node.module)
    assert not imported & BANNED, f"{path.name} imports {imported & BANNED}"
    assert not any(m.startswith("passtd.dataplane.io") for m in imported)
