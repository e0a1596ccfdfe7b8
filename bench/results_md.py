"""docs/results.md is written by several benchmarks: each owns one block between HTML comment
markers and replaces only that block, so regenerating one result keeps the others."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_pair_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark of the embedded tiny pair shares: the two models and the corpus."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--emo", type=Path, default=ROOT / "emo_cli" / "assets" / "tiny-emo")
    ap.add_argument("--std", type=Path, default=ROOT / "emo_cli" / "assets" / "tiny-stdmoe")
    ap.add_argument("--corpus", type=Path, default=ROOT / "corpus")
    return ap


def shown(path: Path) -> Path:
    """`path` as docs/results.md cites it: relative to the repository when inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def replace_block(path: Path, name: str, text: str) -> None:
    """Put `text` between `<!-- begin NAME -->` and `<!-- end NAME -->` in `path` (appended when
    the block is not there yet); the rest of the file is kept as it was."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)
