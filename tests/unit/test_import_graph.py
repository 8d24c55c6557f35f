"""Arrows point down: the project's modules import each other without a cycle, counting every import
statement (inside functions and ``TYPE_CHECKING`` blocks too) and package ``__init__`` re-exports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rlplat", "actors", "rewards", "kernels", "launch", "tests")


def modules() -> dict[str, Path]:
    """Dotted name → file, for every module of the project (a package is its ``__init__.py``)."""
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports: ``import a.b`` names a.b; ``from a import b`` names a (its
    ``__init__`` runs and is read) and a.b when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package that holds this module
                base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_finds_a_cycle_through_a_package_init(tmp_path):
    (tmp_path / "rlplat" / "pkg").mkdir(parents=True)
    (tmp_path / "rlplat" / "__init__.py").write_text("")
    (tmp_path / "rlplat" / "pkg" / "__init__.py").write_text("from rlplat.pkg.a import f\n")
    (tmp_path / "rlplat" / "pkg" / "a.py").write_text("def f():\n    from rlplat.pkg import b\n")
    (tmp_path / "rlplat" / "pkg" / "b.py").write_text("from . import a\n")
    pkg = tmp_path / "rlplat" / "pkg"
    known = {
        "rlplat": tmp_path / "rlplat" / "__init__.py",
        "rlplat.pkg": pkg / "__init__.py",
        "rlplat.pkg.a": pkg / "a.py",
        "rlplat.pkg.b": pkg / "b.py",
    }
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert graph["rlplat.pkg.a"] == {"rlplat.pkg", "rlplat.pkg.b"}
    assert graph["rlplat.pkg.b"] == {"rlplat.pkg", "rlplat.pkg.a"}
    assert cycles(graph) == [["rlplat.pkg", "rlplat.pkg.a", "rlplat.pkg.b"]]


def test_the_project_has_no_import_cycle():
    known = modules()
    assert "rlplat.controller" in known and "kernels.fp8" in known and len(known) > 100
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []
