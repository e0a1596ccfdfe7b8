"""The codebase's shape, as issue 15 measures it: Python modules per folder, import cycles, imports
that point back up the layers, the largest files, and the modules that spell EMO's HF tensor names.

    python bench/structure.py            # a table
    python bench/structure.py --json     # one JSON object

The import graph and the layers are the ones tests/test_structure.py checks.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from test_structure import back_pointing, cycles, imported, modules  # noqa: E402

from emo_cli import ui  # noqa: E402

# Substrings only a checkpoint tensor name of EMO has (the released HF layout).
TENSOR_NAME_MARKS = ("model.layers", "embed_tokens.weight", "mlp.experts", "lm_head.weight", "mlp.gate.weight")


def spells_tensor_names(path: Path) -> bool:
    """Whether a string literal (docstrings aside) in the module holds an EMO tensor name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
               and any(m in n.value for m in TENSOR_NAME_MARKS) for n in ast.walk(tree))


def measure() -> dict:
    known = modules()
    graph = {m: imported(m, f, known) for m, f in known.items()}
    per_folder = Counter(str(f.parent.relative_to(ROOT)) for f in known.values())
    sizes = sorted(((len(f.read_text().splitlines()), str(f.relative_to(ROOT))) for f in known.values()), reverse=True)
    return {
        "modules_per_folder": dict(sorted(per_folder.items())),
        "import_cycles": cycles(graph),
        "back_pointing_imports": back_pointing(graph),
        "largest_files": [{"file": f, "lines": n} for n, f in sizes[:3]],
        "modules_spelling_emo_tensor_names": sorted(str(f.relative_to(ROOT)) for f in known.values()
                                                   if spells_tensor_names(f)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    m = measure()
    if ap.parse_args().json:
        ui.print_json(m)
        return
    rows = [[folder, n] for folder, n in m["modules_per_folder"].items()]
    ui.out.print(ui.table("Python modules per folder", ["folder", "modules"], rows))
    facts = [["import cycles", len(m["import_cycles"])],
             ["imports that point back up", len(m["back_pointing_imports"])],
             *[[f"largest file #{i + 1}", f"{x['file']} ({x['lines']} lines)"] for i, x in enumerate(m["largest_files"])],
             ["modules that spell EMO's tensor names", ", ".join(m["modules_spelling_emo_tensor_names"]) or "none"]]
    ui.out.print(ui.table("structure", ["measure", "value"], facts))


if __name__ == "__main__":
    main()
