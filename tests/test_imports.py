"""netgraft's import graph, read from the source: arrows point one way (no cycles) and a
function-local import is only ever for an optional dependency, never a netgraft module.

The graph is built with ``ast`` from every module under ``src/netgraft``, counting imports
at module level and inside functions, relative and absolute. ``from PACKAGE import name``
depends on ``PACKAGE.name`` when that is a module (Python runs the package's
``__init__`` first, but that is how submodules are reached, not a use of its contents),
and on ``PACKAGE`` itself otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "netgraft"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The netgraft modules one import statement depends on."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:
        is_package = MODULES[module].name == "__init__.py"
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    if source not in MODULES:
        return []
    out = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.append(sub if sub in MODULES else source)
    return sorted(set(out))


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """``(target, line, inside a function)`` for every netgraft import of ``module``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((t, child.lineno, in_function) for t in _targets(module, child))
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, nested)

    visit(tree, False)
    return [(t, line, inside) for t, line, inside in found if t != module]


GRAPH = {m: sorted({t for t, _, _ in _imports(m)}) for m in MODULES}


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                components.append(component)

    for v in graph:
        if v not in index:
            connect(v)
    return [_path_through(graph, set(c), min(c)) for c in components]


def _path_through(graph: dict[str, list[str]], members: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside one component."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a cycle but no path returns to it")


def test_the_graph_sees_every_module_and_real_imports():
    assert "netgraft.recipe" in MODULES and "netgraft.grow" in MODULES
    assert "netgraft.errors" in GRAPH["netgraft.recipe"]
    assert "netgraft.grow.deepen" in GRAPH["netgraft.grow"]  # relative import in a package


def test_cycle_finder_reports_a_cycle_as_a_path():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": ["b"], "b": []}) == []


def test_netgraft_modules_import_each_other_without_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_imports_a_netgraft_module(module):
    local = [f"line {line}: {t}" for t, line, inside in _imports(module) if inside]
    assert not local, (
        f"{module} imports netgraft modules inside functions (a function-local import is "
        f"only for an optional dependency): " + "; ".join(local)
    )
