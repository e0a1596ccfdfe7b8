"""The package's import graph has no cycles, and no import points back up the layers.

Every module can be read after the ones it imports, and a package only uses packages below it.

The graph is read from the source (ast), not from a running interpreter: an import inside a
function counts as much as one at the top, since it is the same dependency, only deferred. Imports
under `if TYPE_CHECKING:` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"emo_cli": ROOT / "emo_cli", "emo_kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = [pkg, *f.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `module` imports at run time (a `from X import name` counts X, and
    X.name when that is a module)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: None if path.name == "__init__.py" else -1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in out if m in known and m != module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    known = modules()
    graph = {m: imported(m, f, known) for m, f in known.items()}
    # relative and absolute imports are both read (gguf/runtime.py imports both packages)
    assert {"emo_cli.arch.routing", "emo_kernels.cpu"} <= graph["emo_cli.gguf.runtime"]
    assert cycles(graph) == []


# Bottom to top. A module may import from its own unit or from any unit in a lower layer.
LAYERS = [
    {"core": ["emo_cli", "emo_cli.errors", "emo_cli.outputs", "emo_cli.ui"], "kernels": ["emo_kernels"]},
    {"arch": ["emo_cli.arch"], "data": ["emo_cli.data"]},
    {"model": ["emo_cli.model"]},
    {"gguf": ["emo_cli.gguf"]},
    {"runtime": ["emo_cli.runtime"], "info": ["emo_cli.info"], "workspace": ["emo_cli.workspace"]},
    {"chat": ["emo_cli.chat"]},
    {"evaluation": ["emo_cli.evaluation"]},
    {"experts": ["emo_cli.experts"], "training": ["emo_cli.training"]},
    {"lab": ["emo_cli.lab"]},
    {"cli": ["emo_cli.cli", "emo_cli.__main__"]},
]


def unit_of(module: str) -> tuple[int, str]:
    """(layer, unit) of the longest prefix that names `module` or a package holding it."""
    best = max(((rank, unit, p) for rank, units in enumerate(LAYERS) for unit, prefixes in units.items()
                for p in prefixes if module == p or module.startswith(p + ".")), key=lambda x: len(x[2]))
    return best[0], best[1]


def back_pointing(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports of a unit in the same or a higher layer than the importer's own unit."""
    bad = []
    for m, targets in graph.items():
        rank, unit = unit_of(m)
        for t in targets:
            t_rank, t_unit = unit_of(t)
            if t_unit != unit and t_rank >= rank:
                bad.append((m, t))
    return sorted(bad)


def test_layering_finder_sees_an_upward_import():
    assert back_pointing({"emo_cli.model.loading": {"emo_cli.experts.usage_profile", "emo_cli.arch.emo"}}) == \
        [("emo_cli.model.loading", "emo_cli.experts.usage_profile")]
    assert back_pointing({"emo_cli.experts.usage_profile": {"emo_cli.training.shared"}}) == \
        [("emo_cli.experts.usage_profile", "emo_cli.training.shared")]


def test_every_module_belongs_to_a_layer_and_none_imports_upward():
    known = modules()
    for m in known:
        unit_of(m)  # raises on a module outside every layer
    graph = {m: imported(m, f, known) for m, f in known.items()}
    assert back_pointing(graph) == []


def test_the_command_line_starts_without_torch():
    """`emo --help` and argument errors answer at once: the commands import torch, numpy-heavy
    modules and models only when they run, and the choices come from light registries."""
    import subprocess
    import sys

    code = "import sys, emo_cli.cli.app; print(sorted(m for m in ('torch', 'safetensors', 'datasets') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
