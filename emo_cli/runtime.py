"""Open any MODEL for computation: an HF directory (or cached repo id) or a .gguf file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import EmoConfig
from .loading import is_gguf, load_hf_model, parse_dtype, resolve_model_path
from .tokenizer import EmoTokenizer


@dataclass
class LoadedModel:
    model: object  # EmoForCausalLM or the GGUF runtime model (same forward/hidden_states API)
    tokenizer: EmoTokenizer
    path: Path
    config: EmoConfig
    fingerprint: str
    kind: str  # "hf" or "gguf"


def load_model(spec, device: str = "cpu", dtype: str | None = None, backend: str = "auto") -> LoadedModel:
    path = resolve_model_path(spec)
    if is_gguf(path):
        from .gguf_runtime import load_gguf_model

        return load_gguf_model(path, device=device, backend=backend)
    model, files = load_hf_model(path, device=device, dtype=parse_dtype(dtype))
    cfg = files.config
    tok = EmoTokenizer.from_dir(path, cfg.eos_token_id, cfg.pad_token_id)
    return LoadedModel(model, tok, path, cfg, files.fingerprint, "hf")
