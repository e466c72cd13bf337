"""The project's import graph, read with `ast` (no imports executed): for the architecture tests."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("train", "data_pipeline", "launch")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level?) for every import in one file.

    `if TYPE_CHECKING:` imports count as module level: a cycle through type hints is still a cycle."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    top = {id(n) for n in tree.body}
    for node in tree.body:
        if isinstance(node, ast.If):
            top |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, node.lineno, id(node) in top))
    return out


def graph(root: Path) -> dict[str, list[tuple[str, int, bool]]]:
    mods = modules(root)
    return {m: imports_of(p, m, set(mods)) for m, p in mods.items()}


def cycles(g: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), counting every import."""
    edges = {m: sorted({t for t, _, _ in deps if t in g}) for m, deps in g.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for m in edges:
        if m not in index:
            visit(m)
    return out
