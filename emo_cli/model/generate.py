"""Token generation: engines with a KV cache, sampling, and streaming detokenization.

An engine holds the tokens it has cached and returns the next-token logits after `feed`; chat
sessions rewind it to the longest common prefix of the new context, so a conversation never
recomputes what is already cached. `EmoEngine` runs emo's models (HF or GGUF runtime);
llama_backend.LlamaCppEngine runs a GGUF through llama-cpp-python with the same interface.

Sampling: temperature 0 is plain argmax (no repetition penalty, nothing added to the prompt);
otherwise logits / temperature, then top-k, then top-p (nucleus), then a draw from a seeded
torch.Generator, so a given --seed reproduces a run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from emo_cli.errors import EmoError


class Engine(Protocol):
    tokens: list[int]  # ids whose keys/values are cached, in order
    max_context: int

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Append ids to the cache; return fp32 logits [V] for the position after the last one."""

    def rewind(self, n: int) -> None:
        """Keep only the first n cached tokens."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class EmoEngine:
    """An emo model (EmoForCausalLM or gguf_runtime.GGUFModel) with its KV cache."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.cache = model.new_cache()
        self.tokens: list[int] = []
        self.max_context = int(model.config.max_position_embeddings)

    def feed(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        with torch.no_grad():
            h = self.model.run_layers(self.model.embed(x), 0, self.model.num_layers, cache=self.cache)
            logits = self.model.logits(h[:, -1:])  # only the last position is sampled
        self.tokens += ids
        return logits[0, -1].float().cpu()

    def rewind(self, n: int) -> None:
        self.tokens = self.tokens[:n]
        self.cache.length = n  # later writes overwrite the stale positions

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    seed: int | None = None
    max_new_tokens: int = 256

    def validate(self) -> None:
        if self.temperature < 0:
            raise EmoError("--temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise EmoError("--top-p must be in (0, 1]")
        if self.top_k < 0:
            raise EmoError("--top-k must be >= 0 (0 = off)")
        if self.max_new_tokens < 0:
            raise EmoError("--max-new-tokens must be >= 0")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] fp32 -> next token id."""
        if self.p.temperature == 0:
            return int(torch.argmax(logits))
        scores = logits.float() / self.p.temperature
        if self.p.top_k and self.p.top_k < scores.numel():
            kth = torch.topk(scores, self.p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.p.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True)
            cum = torch.softmax(sorted_scores, -1).cumsum(-1)
            # drop a token when the tokens before it already cover top_p (the first always stays)
            drop = (cum - torch.softmax(sorted_scores, -1)) >= self.p.top_p
            scores = scores.index_fill(0, order[drop], float("-inf"))
        probs = torch.softmax(scores, -1)
        return int(torch.multinomial(probs, 1, generator=self.gen))


class TextStream:
    """Incremental detokenization: text appears as soon as it is whole UTF-8.

    Byte-level tokens can split a character; decoding the pending ids then ends in U+FFFD, so
    they are held back until the character completes (or, after 4 ids, emitted as they are: the
    bytes are really invalid or the text really ends in U+FFFD).
    """

    HOLD = 4

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.pending: list[int] = []

    def push(self, tok: int) -> str:
        self.pending.append(tok)
        text = self.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.HOLD:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens computed for the prompt (after reusing the cache)
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    stop: str = ""  # "eos", "length", "context", "interrupted"
    tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first new token comes out of the prefill; the decode steps made the rest
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def generate(engine: Engine, context: list[int], params: SamplingParams, stop_ids: set[int],
             stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield new tokens continuing `context` (the whole conversation so far, cached or not).

    Reuses the longest cached prefix of `context`; stops at an id in `stop_ids` (not yielded),
    after max_new_tokens, or at the context limit. Fills `stats` as it goes.
    """
    stats = stats if stats is not None else GenerationStats()
    sampler = Sampler(params)
    if not context:
        raise EmoError("empty prompt: nothing to continue")
    if len(context) >= engine.max_context:
        raise EmoError(f"the prompt has {len(context)} tokens; the model's context is {engine.max_context}")
    keep = 0
    for a, b in zip(engine.tokens, context):
        if a != b:
            break
        keep += 1
    keep = min(keep, len(context) - 1)  # at least one token is fed, to get logits
    engine.rewind(keep)
    if params.max_new_tokens == 0:
        stats.stop = "length"
        return
    t0 = time.perf_counter()
    logits = engine.feed(context[keep:])
    stats.prompt_tokens, stats.prefill_s = len(context) - keep, time.perf_counter() - t0
    t0 = time.perf_counter()
    pending: int | None = None
    try:
        while True:
            if pending is not None:
                logits = engine.feed([pending])
            tok = sampler(logits)
            if tok in stop_ids:
                stats.stop = "eos"
                return
            stats.new_tokens += 1
            stats.tokens.append(tok)
            stats.decode_s = time.perf_counter() - t0
            yield tok
            if stats.new_tokens >= params.max_new_tokens:
                stats.stop = "length"
                return
            if len(engine.tokens) + 1 >= engine.max_context:
                stats.stop = "context"
                return
            pending = tok
    finally:
        stats.decode_s = time.perf_counter() - t0
