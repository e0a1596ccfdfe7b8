"""Model configs as config.json holds them: the file read with one-line errors, and every field
checked against the type its dataclass annotation names, before any architecture looks at it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from emo_cli.errors import EmoError

MAX_LAYERS = 10_000  # far above any released model; bounds the per-layer checks of a corrupt file


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EmoError(f"{path}: not UTF-8 text") from None
    except FileNotFoundError:
        raise EmoError(f"{path}: missing config.json (not a Hugging Face model directory)") from None
    except json.JSONDecodeError as e:
        raise EmoError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise EmoError(f"config.json holds a JSON {type(raw).__name__}, not an object")
    return raw


def typed_fields(cls, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the dataclass fields `raw` sets, each checked against its annotation; the unknown keys, kept
    so that a config written back stays loadable upstream)."""
    annotations = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "extra"}
    kwargs = {k: v for k, v in raw.items() if k in annotations}
    for k, v in kwargs.items():
        if not conforms(v, annotations[k]):
            raise EmoError(f"config: {k} is {json.dumps(v)[:40]}, expected {annotations[k]}")
    return kwargs, {k: v for k, v in raw.items() if k not in annotations}


def _alternatives(annotation: str) -> list[str]:
    """'list[int | None] | None' -> ['list[int | None]', 'None']: split at top-level bars."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            out.append(annotation[start:i].strip())
            start = i + 1
    return out + [annotation[start:].strip()]


def conforms(value: Any, annotation: str) -> bool:
    """Whether a JSON value has the type a field's annotation names (bool is not an int here)."""
    for alt in _alternatives(annotation):
        if alt == "None" and value is None:
            return True
        if alt == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if alt == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if alt in ("bool", "str", "dict") and isinstance(value, {"bool": bool, "str": str, "dict": dict}[alt]):
            return True
        if alt.startswith("list[") and isinstance(value, list) and all(conforms(v, alt[5:-1]) for v in value):
            return True
    return False
