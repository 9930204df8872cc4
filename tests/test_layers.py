"""The architecture holds (docs/architecture.md, "Layers"): imports point down only, no file
imports itself back through others, and the top floors keep their functions short.

Every ``import``/``from … import`` in src/destatic counts, also those inside functions (a lazy
import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src"
PACKAGE = SRC / "destatic"

# Bottom to top; a module may import its own layer and those below it. training and metrics
# are siblings (one layer, but neither may import the other). The command line starts
# everything, the server included; the package face is for users, not for library code.
LAYERS: list[set[str]] = [
    {"bundled", "io"},
    {"data"},
    {"process"},
    {"sampling"},
    {"models", "lab"},
    {"pipelines"},
    {"training", "metrics"},
    {"serve"},
    {"cli", "__init__"},
]
SIBLINGS = [{"training", "metrics"}, {"models", "lab"}, {"bundled", "io"}]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The destatic modules that ``path`` imports (``from destatic.x import y`` counts y when
    y is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("destatic"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("destatic"):
                found.add(node.module)
                for a in node.names:
                    candidate = f"{node.module}.{a.name}"
                    if _exists(candidate):
                        found.add(candidate)
    return found


def _exists(module: str) -> bool:
    base = SRC.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def _layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _rank(layer: str) -> int:
    for rank, names in enumerate(LAYERS):
        if layer in names:
            return rank
    raise AssertionError(f"{layer!r} is in no layer: add it to LAYERS and the docs")


def test_every_folder_has_a_layer():
    for module in _graph():
        _rank(_layer_of(module))


def test_imports_point_down():
    upward = []
    for module, imported in _graph().items():
        here = _layer_of(module)
        for target in imported:
            there = _layer_of(target)
            if there == "__init__" and here != "__init__":
                if module.count(".") >= 1 and here not in ("cli", "serve"):
                    upward.append(f"{module} -> {target} (library code uses the package face)")
                continue
            sibling = any({here, there} <= s for s in SIBLINGS) and here != there
            if _rank(there) > _rank(here) or sibling:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that run up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ re-exporting its submodules is not a circle of ideas
    real = [c for c in circles if not _through_package_face(c)]
    assert not real, "import circles:\n" + "\n".join(" -> ".join(c) for c in real)


def _through_package_face(circle: list[str]) -> bool:
    """A circle that only closes through a package's own ``__init__`` (a module importing a
    sibling via the package face that re-exports it)."""
    packages = {m for m in circle if (SRC.joinpath(*m.split(".")) / "__init__.py").is_file()}
    return any(all(m == p or m.startswith(p + ".") for m in circle) for p in packages)


@pytest.mark.parametrize("where", ["pipelines", "cli.py", "serve"])
def test_top_floor_functions_are_short(where):
    root = PACKAGE / where
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines})")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
