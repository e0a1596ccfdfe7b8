"""`--backend llama.cpp`: a GGUF run whole by llama-cpp-python, behind generate.Engine's interface.

The KV cache is kept in fp32 (llama.cpp's default is fp16), so llama.cpp computes what emo's
runtime computes and the two can be compared token for token. Tokenization is llama.cpp's own.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from emo_cli.errors import EmoError


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints its loading log from C to fd 2; keep the terminal clean unless it fails."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class LlamaCppEngine:
    def __init__(self, path: Path, threads: int | None = None, n_ctx: int | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise EmoError("--backend llama.cpp needs llama-cpp-python: pip install llama-cpp-python==0.3.36") from None
        self._llama_cpp = llama_cpp
        threads = threads or os.cpu_count() or 1
        try:
            with _quiet_stderr():
                self.llm = llama_cpp.Llama(
                    str(path), n_ctx=n_ctx or 0, n_threads=threads, n_threads_batch=threads,
                    type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
        except ValueError as e:
            raise EmoError(f"{path}: llama.cpp could not load it ({e})") from None
        self.max_context = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self.tokens: list[int] = []
        eos = self.llm.token_eos()
        self.eos_ids = {eos} if eos >= 0 else set()

    def feed(self, ids: list[int]) -> torch.Tensor:
        self.llm.n_tokens = len(self.tokens)  # eval() drops cached positions from n_tokens on
        self.llm.eval(ids)
        self.tokens += ids
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def rewind(self, n: int) -> None:
        self.tokens = self.tokens[:n]

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.llm.close()
