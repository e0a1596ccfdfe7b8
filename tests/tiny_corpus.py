"""A small pip-sourced corpus (code, medical, legal), built once per test session."""

from __future__ import annotations

from pathlib import Path

from emo_cli.lab.corpus import CorpusSpec, build_corpus

SMALL = dict(domains=("code", "medical", "legal"), max_chars_per_domain=30_000, max_heldout_docs=6,
             min_chars=300, max_chars=1500, fetch=False)
_built: dict[str, Path] = {}


def small_corpus(base: Path) -> Path:
    """The corpus directory (built under `base` on first use, then shared)."""
    if "dir" not in _built:
        out = Path(base) / "corpus"
        build_corpus(out, CorpusSpec(**SMALL))
        _built["dir"] = out
    return _built["dir"]
