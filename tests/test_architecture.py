"""The package's module graph: no import cycles, no private names across modules, the CLI on top.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a lazy import
hides a cycle from Python, not from the next engineer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("partitioner", "cost_models")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(mod: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges() -> list[tuple[str, str, str | None]]:
    """(importer, imported module, name or None) for every import of the package's own modules."""
    mods = _modules()
    edges = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [(mod, a.name, None) for a in node.names if a.name in mods]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path, node)
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:  # ``from . import plots``: the module itself
                        edges.append((mod, sub, None))
                    elif target in mods:
                        edges.append((mod, target, a.name))
    return edges


def cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        if a != b and not b.startswith(a + ".") and a != b.rsplit(".", 1)[0]:
            graph.setdefault(a, set()).add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycles():
    assert cycles(import_edges()) == []


def test_no_private_name_is_imported_across_modules():
    private = [f"{a} <- {b}.{n}" for a, b, n in import_edges() if n and n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_the_cli_sits_on_top():
    importers = sorted({a for a, b, _ in import_edges() if b == "partitioner.cli"} - {"partitioner.__main__"})
    assert importers == []


def test_the_checks_see_a_cycle_and_a_private_import():
    # The checks above pass only because the graph is clean, not because they cannot see.
    edges = [("p.a", "p.b", None), ("p.b", "p.c", "_x"), ("p.c", "p.a", None), ("p.c", "p.d", None)]
    assert cycles(edges) == [["p.a", "p.b", "p.c"]]
    assert len(import_edges()) > 50
    assert any(b == "partitioner.plan" for _, b, _ in import_edges())
