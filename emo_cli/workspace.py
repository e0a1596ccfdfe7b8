"""`.emo/state.json` in the working directory: the last model and profile, so that a bare
`emo prune --budget 25%` continues where `emo profile` left off.

Model resolution order (docs/design.md#where-model-comes-from): --model, else $EMO_MODEL, else the workspace, else the
released model found in the local Hugging Face cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from emo_cli.errors import EmoError
from emo_cli.model.loading import DEFAULT_MODEL, find_in_hf_cache
from emo_cli.outputs import write_atomic

STATE = Path(".emo") / "state.json"


def read_state() -> dict:
    if not STATE.is_file():
        if STATE.exists():
            raise EmoError(f"{STATE}: not a file (delete it and run `emo profile` again)")
        return {}
    try:
        state = json.loads(STATE.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    except OSError as e:
        raise EmoError(f"{STATE}: cannot read ({e.strerror or e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, str) for v in state.values()):
        raise EmoError(f"{STATE}: corrupt workspace state (delete it and run `emo profile` again)")
    return state


def update_state(**values) -> None:
    state = read_state()
    state.update({k: v for k, v in values.items() if v is not None})
    STATE.parent.mkdir(exist_ok=True)
    text = json.dumps(state, indent=2) + "\n"
    write_atomic(STATE, lambda tmp: tmp.write_text(text))


def resolve_default_model(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("EMO_MODEL"):
        return os.environ["EMO_MODEL"]
    state = read_state()
    if state.get("model"):
        return state["model"]
    if find_in_hf_cache(DEFAULT_MODEL) is not None:
        return DEFAULT_MODEL
    raise EmoError(
        f"no model given and {DEFAULT_MODEL} is not in the local Hugging Face cache: pass --model DIR, "
        f"set EMO_MODEL, or download it with `huggingface-cli download {DEFAULT_MODEL}` "
        f"(`emo demo` runs the whole pipeline on emo's embedded tiny model)"
    )


def absolute_if_local(spec: str) -> str:
    p = Path(spec)
    return str(p.resolve()) if p.exists() else spec
