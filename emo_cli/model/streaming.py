"""The layer-streamed EMO model: the model interface (model/api.py) over a memory-mapped checkpoint
with one part resident at a time.

A part is one decoder layer, or the head (final norm + lm_head). Asking for another part drops the
current one before the next is read, so process memory holds one layer (converted to the compute
dtype, on the compute device) plus the hidden states of the pass; the checkpoint itself stays in
the kernel's page cache, shared and reclaimable. Embeddings are gathered row by row straight from
the map, so the embedding matrix is never loaded at all. While a layer computes, the kernel is
asked to read the next one ahead (posix_fadvise), so a checkpoint larger than the page cache
streams from disk without stalls.

Loading goes through loading.load_block, the same code that builds the resident model, so a
streamed pass computes with exactly the resident model's weights and gives identical numbers.

Shape legend: B batch, S sequence, D hidden, E experts of a layer, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emo_cli.arch.layers import KVCache, Observer, RMSNorm, rope_for, run_blocks
from emo_cli.model.loading import (
    HFModelFiles,
    check_checkpoint,
    load_block,
    read_weight,
    source_expert_ids,
)


class StreamedModel:
    def __init__(self, files: HFModelFiles, device: str, dtype: torch.dtype, activation_budget: int):
        check_checkpoint(files)
        self.files, self.config = files, files.config
        self._device = torch.device(device)
        self.dtype = dtype
        self.activation_budget = activation_budget
        self._ids = source_expert_ids(files.dir, files.config)
        self._part: tuple[object, object] | None = None  # (key, module): the one resident part
        self.parts_loaded = 0  # how many times a part was read from the checkpoint

    # ---- the model interface ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def expert_ids(self) -> list[list[int] | None]:
        return [list(x) if x is not None else None for x in self._ids]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.files.ckpt.view(self.files.names.embed)[input_ids.cpu()]  # [B, S, D] gathered from the map
        return rows.to(device=self._device, dtype=self.dtype)

    def run_layers(self, h: torch.Tensor, start: int, stop: int, masks: dict | None = None,
                   observer: Observer | None = None, cache: KVCache | None = None) -> torch.Tensor:
        return run_blocks(self.config, self._layer, h, start, stop, masks, observer, cache, self._device)

    def router_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self._layer(layer).router_probs(h, *rope_for(self.config, h.shape[1], 0, self._device))  # [T, E]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        norm, lm_head = self._resident("head", self._load_head)
        return F.linear(norm(h), lm_head).float()  # [..., V], as nn.Linear in the resident model

    def release(self) -> None:
        self._part = None

    # ---- parts --------------------------------------------------------------------------------
    def _resident(self, key, load):
        if self._part is not None and self._part[0] == key:
            return self._part[1]
        self._part = None  # drop the current part first: never two layers at once
        part = load()
        self.parts_loaded += 1
        self._part = (key, part)
        return part

    def _layer(self, i: int):
        def load():
            block = load_block(self.files, i, self._device, self.dtype, self._ids[i])
            if i + 1 < self.num_layers:
                self.files.ckpt.prefetch(self.files.names.in_layer(i + 1, ""))
            else:
                self.files.ckpt.prefetch(self.files.names.lm_head)
            return block

        return self._resident(("layer", i), load)

    def _load_head(self):
        D, V = self.config.hidden_size, self.config.vocab_size
        norm = RMSNorm(D, self.config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(read_weight(self.files, self.files.names.final_norm, (D,), self._device, self.dtype),
                                         requires_grad=False)
        return norm, read_weight(self.files, self.files.names.lm_head, (V, D), self._device, self.dtype)
