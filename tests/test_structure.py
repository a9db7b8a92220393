"""The import structure: no cycle among passtd's modules, and the light entry points stay light.

The cycle check walks every import statement of every module with `ast` (also those inside functions and
under `if TYPE_CHECKING:`), plus the implicit edge from a module to its parent package, whose `__init__`
runs first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("passtd", "passtctl")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "pb" in path.relative_to(ROOT).parts:  # generated gRPC code
                continue
            found[_module_name(path)] = path
    return found


def _imports(tree: ast.Module) -> list[str]:
    """Every module the code may import: lazy imports in functions and type-checking ones count too, so a
    cycle cannot hide behind an import moved into a function (the old daemon ↔ options cycle did)."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target in _imports(ast.parse(path.read_text(), str(path))):
            if target in modules and target != name:
                graph[name].add(target)
        parent = name.rpartition(".")[0]
        if parent in modules:
            graph[name].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first == last), or None; iterative DFS with colours."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the stack, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        colour[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if colour[nxt] == 1:
                return [*path[path.index(nxt) :], nxt]
            if colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, sorted(graph[nxt])))
                path.append(nxt)
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_passtd_modules() -> None:
    graph = import_graph()
    assert "passtd.daemon" in graph and "passtd.options" in graph
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])


def test_the_option_layer_does_not_import_the_daemon() -> None:
    graph = import_graph()
    for module in ("passtd.options", "passtd.resolve", "passtd.plan", "passtd.config"):
        assert "passtd.daemon" not in graph[module]
    assert "passtd.options" not in graph["passtd.daemon"]


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("passtctl.cli", ("pyroute2", "uvloop", "passtd.dataplane", "passtd.daemon", "passtd.options")),
        ("passtd.options", ("pyroute2", "grpc", "uvloop", "asyncio", "passtd.dataplane", "passtd.config")),
        ("passtd.__main__", ("pyroute2", "grpc", "uvloop", "asyncio", "passtd.dataplane", "passtd.daemon")),
        ("passtd", ("passtd.native", "passtd.dataplane", "pyroute2", "grpc")),
    ],
)
def test_light_modules_stay_light(module: str, forbidden: tuple[str, ...]) -> None:
    code = f"import sys, {module}; print(sorted(m for m in {forbidden!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# Which layer may import which (ARCHITECTURE.md draws the same picture). A module matches the first prefix
# that names it; its imports may only reach the layers listed for it (and passtd's leaf modules below).
LEAVES = (
    "passtd",
    "passtd.errors",
    "passtd.limits",
    "passtd.unixsock",
    "passtd.dataplane",
    "passtd.control",
)  # packages: no code
LAYERS: dict[str, tuple[str, ...]] = {
    "passtd.dataplane.packets": ("passtd.dataplane.packets",),
    "passtd.dataplane.core": ("passtd.dataplane.packets", "passtd.dataplane.core"),
    "passtd.dataplane.io": ("passtd.dataplane", "passtd.logging"),
    "passtd.control.api": ("passtd.dataplane.core", "passtd.control.api"),
    "passtd.control.convert": ("passtd.control.api", "passtd.control.pb", "passtd.dataplane.core"),
    "passtd.control.service": ("passtd.control",),
    "passtd.control.server": ("passtd.control", "passtd.logging"),
    "passtctl": ("passtctl", "passtd.paths", "passtd.control.pb"),
}


def _layer(module: str) -> str | None:
    return next((p for p in LAYERS if module == p or module.startswith(p + ".")), None)


def test_layers_import_only_downwards() -> None:
    """The data path never reaches up into the control plane or the daemon, the pure core never into io,
    the gRPC adapter talks to the daemon only through control/api.py, and passtctl never loads passtd."""
    wrong = []
    for module, targets in sorted(import_graph().items()):
        layer = _layer(module)
        if layer is None:
            continue
        allowed = LAYERS[layer]
        for target in sorted(targets):
            ok = target in LEAVES or any(target == a or target.startswith(a + ".") for a in allowed)
            if not ok:
                wrong.append(f"{module} → {target}")
    assert wrong == []
