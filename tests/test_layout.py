"""The shape of the code: layers that point one way, no import cycles, no private names shared, small files.

Read from the source with ``ast`` (nothing is imported), with the installed package names mapped to their
folders (``maskpro.export`` is ``export/``, ``maskpro.serve`` is ``serve/``, ``maskpro.bench`` is
``benchmarks/``), so a cycle hidden by that mapping is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"maskpro": ROOT / "maskpro", "maskpro.export": ROOT / "export", "maskpro.serve": ROOT / "serve",
            "maskpro.bench": ROOT / "benchmarks"}
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], bool]]:
    """(module imported, names taken from it, whether at module level) for every import of ``name``'s file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body} | {id(s) for n in tree.body if isinstance(n, ast.Try) for s in n.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            for n in names:  # `from pkg import module` imports the module
                if f"{target}.{n}" in known:
                    found.append((f"{target}.{n}", [], id(node) in top_level))
            found.append((target, names, id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in top_level) for a in node.names]
    return [(t, n, top) for t, n, top in found if t in known]


def test_no_python_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"files over {MAX_LINES} lines: {long}"


def test_core_never_imports_export_serve_or_bench():
    known = modules()
    outer = ("maskpro.export", "maskpro.serve", "maskpro.bench")
    bad = [(m, t) for m, p in known.items() if not m.startswith(outer)
           for t, _, _ in imports(m, p, known) if t.startswith(outer)]
    assert bad == []


def test_no_import_cycles_at_module_level():
    known = modules()
    graph = {m: {t for t, _, top in imports(m, p, known) if top and t != m and not m.startswith(t + ".")}
             for m, p in known.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == [], cycles


def test_no_private_name_imported_across_modules():
    known = modules()
    bad = [f"{m} imports {n} from {t}" for m, p in known.items() for t, names, _ in imports(m, p, known)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []


def test_one_reader_of_the_metadata_file():
    """Only the schema module opens maskpro.json; everyone else asks it."""
    readers = []
    for m, p in modules().items():
        text = p.read_text()
        if '"maskpro.json"' in text and m != "maskpro.schema":
            readers.append(m)
    assert readers == [], f"modules naming maskpro.json instead of using maskpro.schema: {readers}"
