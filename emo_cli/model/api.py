"""The one model interface behind every pass over data and behind chat.

Three runtimes implement it: the resident torch model (arch/emo.py EmoForCausalLM), the
layer-streamed torch model (model/streaming.py StreamedModel: one layer of the memory-mapped checkpoint
resident at a time) and the GGUF model (gguf/runtime.py GGUFModel). Profiling, evaluation,
selection (router, greedy) and chat call only what is listed here, so a pass written once runs
on all three, and streamed and resident runs of it give the same numbers.

Shape legend: B batch, S sequence, T = B*S tokens, N selected tokens, D hidden, E experts of a
layer (shared included), V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from emo_cli.arch.emo import EmoConfig
from emo_cli.arch.layers import KVCache, Observer

if TYPE_CHECKING:
    from emo_cli.model.loading import HFModelFiles
    from emo_cli.model.memory import MemoryPlan
    from emo_cli.model.tokenizer import EmoTokenizer

HEAD_CHUNK_BYTES = 256 * 1024**2  # fp32 logits per lm_head slice: bounds the [N, V] buffer


@dataclass
class LoadedModel:
    """What opening a MODEL gives (runtime.load_model, gguf.runtime.load_gguf_model)."""

    model: object  # a CausalLM: EmoForCausalLM, StreamedModel or GGUFModel
    tokenizer: EmoTokenizer
    path: Path
    config: EmoConfig
    fingerprint: str
    kind: str  # "hf" or "gguf"
    memory: MemoryPlan | None = None  # the planner's choice (HF directories)
    files: HFModelFiles | None = None  # the opened HF directory (a GGUF's reader is model.reader)


class CausalLM(Protocol):
    config: EmoConfig
    activation_budget: int  # bytes of hidden states a pass may keep in memory before spilling

    @property
    def device(self) -> torch.device: ...

    @property
    def num_layers(self) -> int: ...

    def expert_ids(self) -> list[list[int] | None]:
        """ORIGINAL expert ids of each layer's experts, in local order (None for dense layers)."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids -> residual stream [B, S, D]."""

    def run_layers(self, h: torch.Tensor, start: int, stop: int, masks: dict | None = None,
                   observer: Observer | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Layers [start, stop) on h [B, S, D]. masks: layer -> bool [E] (one subset) or [T, E]
        (one per token) over the layer's LOCAL experts. With a cache, h continues the cached
        sequence and the cache advances once `stop` is the last layer."""

    def router_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Unmasked routing probabilities [T, E] at `layer` for its input residual stream h."""

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: [..., D] -> fp32 [..., V]."""

    def release(self) -> None:
        """Drop weights held only for the current pass (streamed models); a no-op otherwise."""


def expert_mask(expert_ids: list[int], kept) -> torch.Tensor:
    """[E] bool over a layer's local experts: True where the ORIGINAL id is in `kept`."""
    keep = {int(e) for e in kept}
    return torch.tensor([int(e) in keep for e in expert_ids], dtype=torch.bool)


def masks_for(model: CausalLM, kept: dict[int, list[int]] | None) -> dict[int, torch.Tensor]:
    """Routing masks restricting each listed layer to the kept ORIGINAL expert ids."""
    if not kept:
        return {}
    ids = model.expert_ids()
    return {i: expert_mask(ids[i], v).to(model.device) for i, v in kept.items() if ids[i] is not None}


def token_nll(model: CausalLM, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token NLL in nats (float64) of every row of h [N, D] against targets [N], through the
    lm_head in slices so the fp32 logits never exceed HEAD_CHUNK_BYTES."""
    chunk = max(1, HEAD_CHUNK_BYTES // (4 * max(model.config.vocab_size, 1)))
    out = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
    for s in range(0, h.shape[0], chunk):
        logits = model.logits(h[s:s + chunk])  # [n, V] fp32
        out[s:s + chunk] = F.cross_entropy(logits, targets[s:s + chunk].to(logits.device), reduction="none").double()
    return out


def layout(model: CausalLM) -> dict:
    """Per layer: original expert ids, fixed (shared/always-active) ids, routed top-k."""
    cfg = model.config
    ids, fixed, routed_k = [], [], []
    for i, orig in enumerate(model.expert_ids()):
        if orig is None:
            ids.append(None), fixed.append(None), routed_k.append(0)
            continue
        E = len(orig)
        aa = cfg.layer_always_active(i)
        local_fixed = list(aa) or list(range(E - cfg.layer_shared(i), E))
        ids.append(list(orig))
        fixed.append([orig[j] for j in local_fixed])
        routed_k.append(min(cfg.num_experts_per_tok, E) - len(local_fixed))
    return {"expert_ids": ids, "fixed_ids": fixed, "routed_top_k": routed_k, "top_k": cfg.num_experts_per_tok}
