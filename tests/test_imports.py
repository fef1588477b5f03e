"""No import circles inside nvae: every module can be read knowing only the modules below it.

An import counts wherever it is written (module top or inside a function: both tie the modules
together); imports under ``if TYPE_CHECKING:`` run for type checkers only and do not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under an ``if TYPE_CHECKING:`` block."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(package_root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name imported from a package resolves to the
    submodule when there is one, else to the package itself)."""
    files = {module_name(p, package_root): p for p in package_root.rglob("*.py")}
    top = package_root.name

    def resolve(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == top}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == top:
                    edges |= {resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in files else resolve(base)
                              for a in node.names}
        graph[name] = edges - {name, ""}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_nvae_has_no_import_circle() -> None:
    graph = import_graph(ROOT / "nvae")
    assert len(graph) > 50 and "nvae.model" in graph["nvae.checkpoint"]  # the scan saw the package
    assert circles(graph) == []


def test_a_circle_through_a_function_import_is_found(tmp_path: Path) -> None:
    """The check can fail: a circle closed by an import inside a function, and a package whose
    ``__init__`` imports a module that imports the package back, are both reported; a
    TYPE_CHECKING import is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n")
    (pkg / "sub" / "__init__.py").write_text("from .d import g\n")
    (pkg / "sub" / "d.py").write_text("def g():\n    import pkg.sub as s\n    return s\n")
    assert sorted(circles(import_graph(pkg))) == [["pkg.a", "pkg.b"], ["pkg.sub", "pkg.sub.d"]]
