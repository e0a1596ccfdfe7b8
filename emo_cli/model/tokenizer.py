"""Tokenizer wrapper over `tokenizers` (tokenizer.json); EMO adds no BOS and no special tokens."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from emo_cli.errors import EmoError

# A document is encoded from a character prefix, so the work is bounded by the tokens kept (a 50 MB
# document with --seq-len 256 must not be tokenized in full). First guess: this many characters per
# kept token; the prefix doubles until it gives enough tokens.
PREFIX_CHARS_PER_TOKEN = 8
# Tokens ending this close to a cut may differ from the whole text's (a word cut in two), so they
# are never kept from a prefix.
CUT_MARGIN_CHARS = 64


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
                tcfg = json.loads(tcfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise EmoError(f"{tcfg_path}: invalid JSON") from None
            if not isinstance(tcfg, dict):
                raise EmoError(f"{tcfg_path}: not a JSON object")

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

    def encode_prefixes(self, texts: list[str], max_tokens: int) -> list[tuple[list[int], bool]]:
        """The first `max_tokens` ids of each text, and whether they are the whole text's ids.

        Equal to `encode(text)[:max_tokens]`, with work bounded by max_tokens: a long text is
        encoded from prefixes of doubling length, and ids are taken only once two prefixes agree
        on them, away from the cut (BPE merges never reach across more than a word)."""
        first = max_tokens * PREFIX_CHARS_PER_TOKEN + 16 * CUT_MARGIN_CHARS
        out: list[tuple[list[int], bool] | None] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= first]
        for i, ids in zip(short, self.encode_batch([texts[i] for i in short])):
            out[i] = (ids[:max_tokens], len(ids) <= max_tokens)
        for i, text in enumerate(texts):
            if out[i] is None:
                out[i] = self._long_prefix(text, max_tokens, first)
        return out  # type: ignore[return-value]

    def _long_prefix(self, text: str, max_tokens: int, limit: int) -> tuple[list[int], bool]:
        previous = None
        while len(text) > limit:
            enc = self.tok.encode(text[:limit], add_special_tokens=False)
            safe = [t for t, (_, end) in zip(enc.ids, enc.offsets) if end <= limit - CUT_MARGIN_CHARS]
            if len(safe) >= max_tokens:
                if safe[:max_tokens] == previous:
                    return previous, False
                previous = safe[:max_tokens]
            limit *= 2
        ids = self.encode(text)
        return ids[:max_tokens], len(ids) <= max_tokens

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)
