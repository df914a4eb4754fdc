"""No import cycle between the package's modules, nor between its packages (DESIGN.md's layering).

Every ``import`` statement counts, also those inside functions (lazy imports keep start-up fast but still make
two modules depend on each other). A cycle once ran ``infer -> predict_api/serve/remote -> infer`` through the
``predict`` command living in ``infer/``; the commands now sit above the stages in ``nodulenet.commands``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nodulenet

PACKAGE_ROOT = Path(nodulenet.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from a import b`` counts ``a.b`` when that is a module)."""
    files = {_module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``nodulenet.X`` -> the other ``nodulenet.Y`` it imports (X a sub-package or a top-level module)."""

    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])

    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out.setdefault(top(module), set()).update(top(t) for t in targets if top(t) != top(module))
    return out


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(planted) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    assert "nodulenet.predict_api" in graph["nodulenet.commands.predict"]  # imported inside the command
    assert "nodulenet.model.box_ops" in graph["nodulenet.model.rcnn"]  # from .box_ops import ...


def test_no_module_imports_itself_back() -> None:
    assert cycles(import_graph()) == []


def test_no_package_imports_itself_back() -> None:
    assert cycles(package_graph(import_graph())) == []


def test_no_stage_imports_the_commands() -> None:
    graph = import_graph()
    entry_points = ("nodulenet.commands", "nodulenet.cli", "nodulenet.__main__")
    offenders = sorted(m for m, targets in graph.items() if not m.startswith(entry_points)
                       and any(t.startswith("nodulenet.commands") or t == "nodulenet.cli" for t in targets))
    assert offenders == []
