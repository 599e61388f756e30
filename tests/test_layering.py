"""Layering: no import cycle inside loram, and nothing outside loram/cli imports loram.cli (AST only)."""

from __future__ import annotations

import ast
from pathlib import Path

import loram

ROOT = Path(loram.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every loram module this file imports, at any depth (function-level imports too; not the annotation-only
    imports under `if TYPE_CHECKING:`, which never run)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "loram"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "loram":
                continue
            out.add(mod)
            for a in node.names:  # `from . import x` may name a submodule
                out.add(f"{mod}.{a.name}")
    return out


def _nodes(tree: ast.AST):
    """ast.walk, minus the bodies of `if TYPE_CHECKING:` (annotation-only imports)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None)
            if isinstance(child, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
                todo += child.orelse
                continue
            todo.append(child)


def graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    g = {}
    for name, path in files.items():
        g[name] = {m for m in _imports(path) if m in files and m != name}
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    # Tarjan's strongly connected components; any component of 2+ modules is a cycle
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(graph()) == []


def test_nothing_below_cli_imports_cli():
    bad = {m: sorted(d for d in deps if d == "loram.cli" or d.startswith("loram.cli."))
           for m, deps in graph().items() if not (m == "loram.cli" or m.startswith("loram.cli.") or m == "loram.__main__")}
    assert {m: d for m, d in bad.items() if d} == {}
