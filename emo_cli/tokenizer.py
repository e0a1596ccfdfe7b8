"""Tokenizer wrapper over `tokenizers` (tokenizer.json); EMO adds no BOS and no special tokens."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from .errors import EmoError


class EmoTokenizer:
    def __init__(self, tok: Tokenizer, eos_id: int | None, pad_id: int | None,
                 chat_template: str | None = None):
        self.tok = tok
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, model_dir: Path, config_eos=None, config_pad=None) -> "EmoTokenizer":
        path = Path(model_dir) / "tokenizer.json"
        if not path.exists():
            raise EmoError(f"{model_dir}: missing tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise EmoError(f"{path}: cannot read tokenizer ({str(e).splitlines()[0]})") from None
        tcfg = {}
        tcfg_path = Path(model_dir) / "tokenizer_config.json"
        if tcfg_path.exists():
            try:
                tcfg = json.loads(tcfg_path.read_text())
            except json.JSONDecodeError:
                raise EmoError(f"{tcfg_path}: invalid JSON") from None

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        eos = config_eos[0] if isinstance(config_eos, list) and config_eos else config_eos
        if eos is None:
            eos = token_id(tcfg.get("eos_token"))
        pad = config_pad if config_pad is not None else token_id(tcfg.get("pad_token"))
        return cls(tok, eos, pad, tcfg.get("chat_template"))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)
