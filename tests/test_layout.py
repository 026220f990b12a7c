"""The layout's rules, read from the source: the two experiments are peers that never import each other,
shared code imports neither, the probe imports nothing of the driver, and no modules import each other in
a cycle."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.fast  # read from the source: the fast tier

PACKAGE = REPO / "harness"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every harness module `path` imports, at any depth of the file (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("harness")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules}


@functools.cache  # read once: the four rules read the same sources
def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in PACKAGE.rglob("*.py")}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_alloc_and_serve_never_import_each_other() -> None:
    graph = _graph()
    for a, b in (("harness.alloc", "harness.serve"), ("harness.serve", "harness.alloc")):
        crossing = sorted(f"{m} -> {i}" for m, imports in graph.items() if _within(m, a)
                          for i in imports if _within(i, b))
        assert not crossing, crossing


def test_shared_packages_import_no_experiment() -> None:
    graph = _graph()
    shared = ("harness.measure", "harness.containers", "harness.errors", "harness.probe")
    bad = sorted(f"{m} -> {i}" for m, imports in graph.items() if any(_within(m, s) for s in shared)
                 for i in imports if _within(i, "harness.alloc") or _within(i, "harness.serve")
                 or _within(i, "harness.cli"))
    assert not bad, bad


def test_the_probe_imports_nothing_of_the_driver() -> None:
    graph = _graph()
    bad = sorted(f"{m} -> {i}" for m, imports in graph.items() if _within(m, "harness.probe")
                 for i in imports if not _within(i, "harness.probe") and i != "harness")
    assert not bad, bad


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)
