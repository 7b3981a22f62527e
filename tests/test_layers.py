"""The package's import graph: no cycles, the runtime in layers, the runtime free of torch.

Every module of ``fbnet/``, ``export/`` (``fbnet.export``) and ``runtime/`` (``fbnet.runtime``) is
parsed with :mod:`ast`; every import in it, at module level or inside a function, is an edge to
the project module it names. The runtime's layers, lowest first, are ``engine`` (bundle, backends,
retriever, feature types), ``gallery`` (building, stores, items, first stage, shards, Ray),
``search`` and ``serving``; ``runtime/cli.py`` sits above them all. A module may import its own
layer and those below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: folder -> import name (pyproject.toml's package-dir)
FOLDERS = {"fbnet": "fbnet", "export": "fbnet.export", "runtime": "fbnet.runtime"}
LAYERS = ("engine", "gallery", "search", "serving")
FORBIDDEN_IN_RUNTIME = ("torch", "torchvision", "fbnet.export")


def module_files() -> dict[str, Path]:
    """Import name -> file, for every module of the three folders."""
    out = {}
    for folder, name in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([name, *parts])] = path
    return out


def imports(path: Path, module: str, is_package: bool) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved; for ``from X import
    y`` both ``X`` and ``X.y``, the caller keeping those that are modules)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{a.name}" for a in node.names)
    return names


def project_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between project modules, every imported name per module)."""
    files = module_files()
    edges, raw = {}, {}
    for module, path in files.items():
        names = imports(path, module, path.name == "__init__.py")
        raw[module] = names
        edges[module] = {n for n in names if n in files and n != module}
    return edges, raw


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def layer(module: str) -> int | None:
    """A runtime module's layer (0 = engine ... 3 = serving, 4 = the CLI); None outside them."""
    parts = module.split(".")
    if parts[:2] != ["fbnet", "runtime"] or len(parts) < 3:
        return None
    if parts[2] in LAYERS:
        return LAYERS.index(parts[2])
    return len(LAYERS) if parts[2] == "cli" else None


def test_the_graph_sees_the_runtime_layers():
    edges, _ = project_graph()
    for name in LAYERS:
        assert any(m.startswith(f"fbnet.runtime.{name}.") for m in edges), f"runtime/{name}/ has no modules"
    # function-level imports count: the CLI's deferred import of the server is an edge
    assert "fbnet.runtime.serving.server" in edges["fbnet.runtime.cli"]


def test_no_import_cycles():
    edges, _ = project_graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_runtime_imports_run_one_way():
    edges, _ = project_graph()
    wrong = [f"{m} (layer {LAYERS[layer(m)] if layer(m) < len(LAYERS) else 'cli'}) imports {n}"
             for m, targets in edges.items() if layer(m) is not None
             for n in sorted(targets) if layer(n) is not None and layer(n) > layer(m)]
    assert not wrong, "\n".join(wrong)
    unplaced = [m for m in edges if m.startswith("fbnet.runtime.") and layer(m) is None]
    assert not unplaced, f"runtime modules outside the layers: {unplaced}"


def test_runtime_never_imports_torch_or_export():
    """Nothing under runtime/, nor any project module it reaches, imports torch or fbnet.export."""
    edges, raw = project_graph()
    reached, todo = set(), [m for m in edges if m == "fbnet.runtime" or m.startswith("fbnet.runtime.")]
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo.extend(edges[m])
    bad = [f"{m} imports {n}" for m in sorted(reached) for n in sorted(raw[m])
           if any(n == f or n.startswith(f + ".") for f in FORBIDDEN_IN_RUNTIME)]
    assert not bad, "\n".join(bad)
