"""Architectures by the `model_type` their config.json names, as Hugging Face and mlx-lm find
model code. Adding an architecture is one file in arch/ that declares an `Architecture`, and one
line here (docs/architectures.md)."""

from __future__ import annotations

from pathlib import Path

from emo_cli.arch import emo
from emo_cli.arch.config import read_config_json
from emo_cli.arch.spec import Architecture
from emo_cli.errors import EmoError

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (emo.ARCH,)}


def architecture(model_type) -> Architecture:
    if model_type not in ARCHITECTURES:
        known = ", ".join(f"'{t}'" for t in ARCHITECTURES)
        raise EmoError(f"unsupported model_type {model_type!r} in config.json (emo runs EMO models: "
                       f"model_type {known})")
    return ARCHITECTURES[model_type]


def read_config(path: Path):
    """(architecture, its validated config) of a config.json."""
    raw = read_config_json(path)
    arch = architecture(raw.get("model_type"))
    return arch, arch.config_class.from_dict(raw)
