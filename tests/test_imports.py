"""krimp's import graph has no cycles: the arrows run from the CLI and the pipeline down to the methods,
exporters and readers, never back up (a cycle held together by function-level imports included)."""

import ast
from pathlib import Path

import krimp

ROOT = Path(krimp.__file__).parent.parent


def _graph() -> dict[str, set[str]]:
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "krimp").rglob("*.py")
    }

    def owner(name: str) -> str:  # the krimp module a dotted name lives in
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                names |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[mod] = {owner(n) for n in names if n.startswith("krimp")} - {"", mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, out = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 90 and "krimp.methods" in graph["krimp.pipeline"]  # the walk saw the package
    cycles = _cycles(graph)
    detail = [[f"{a} -> {sorted(graph[a] & set(c))}" for a in c] for c in cycles]
    assert not cycles, f"import cycles: {detail}"


def test_the_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
