"""Layer-major passes over data: every batch through layer i, then every batch through layer i+1.

A streamed model holds one layer at a time, so a pass must finish a layer for all documents before
it moves on: each weight is then read (and converted) once per pass instead of once per batch, and
only the residual streams of the documents in flight live between layers. A resident model runs
the same order. Every batch meets the same operations on the same weights as in a batch-major
forward, so the numbers are identical; only the interleaving differs.

Shape legend: B batch, S sequence, D hidden, C candidate copies of a batch.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from emo_cli.model.api import CausalLM, token_nll

StepFn = Callable[[int, int], None]  # (layer, batch index) after each step, for progress


class HiddenStore:
    """The residual streams [B, S, D] of every batch in flight between layers.

    Within `budget` bytes they stay in memory (on the model's device); past it they live in an
    unlinked temporary file mapped shared, so they are file pages the kernel can write back
    under pressure rather than anonymous memory, and vanish when the store is closed. With `path`
    they always live in that file, which stays (a resumable run's checkpoint; an existing file of
    the right size is opened as it is).
    """

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, budget: int,
                 path: Path | None = None):
        self.shapes = [tuple(s) for s in shapes]
        self.device = device
        self.path = path
        itemsize = torch.empty((), dtype=dtype).element_size()
        sizes = [math.prod(s) for s in self.shapes]
        self.nbytes = sum(sizes) * itemsize
        self.spilled = path is not None or (self.nbytes > budget and self.nbytes > 0)
        self._parts: list[torch.Tensor | None] = [None] * len(shapes)
        if self.spilled and self.nbytes:
            if path is None:
                fd, name = tempfile.mkstemp(prefix="emo-hidden-", suffix=".bin")  # under $TMPDIR
            else:
                fd, name = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), str(path)
            try:
                if os.fstat(fd).st_size != self.nbytes:
                    os.ftruncate(fd, self.nbytes)
                flat = torch.from_file(name, shared=True, size=sum(sizes), dtype=dtype)
            finally:
                os.close(fd)
                if path is None:
                    os.unlink(name)  # the mapping keeps the pages; the name is gone even if emo dies
            off = 0
            for i, (shape, n) in enumerate(zip(self.shapes, sizes)):
                self._parts[i] = flat[off:off + n].view(shape)
                off += n

    def sync(self) -> None:
        """Make a named store durable: its pages reach the disk before a checkpoint points at it."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        t = self._parts[i]
        return t.to(self.device) if self.spilled else t

    def __setitem__(self, i: int, h: torch.Tensor) -> None:
        if self.spilled:
            self._parts[i].copy_(h)
        else:
            self._parts[i] = h

    def close(self) -> None:
        self._parts = [None] * len(self.shapes)


@torch.no_grad()
def embed_batches(model: CausalLM, id_batches: list[torch.Tensor]) -> HiddenStore:
    """Embed every batch [B, S] into a new store of residual streams."""
    D = model.config.hidden_size
    first = model.embed(id_batches[0]) if id_batches else None
    dtype = first.dtype if first is not None else torch.float32
    store = HiddenStore([(ids.shape[0], ids.shape[1], D) for ids in id_batches], dtype, model.device,
                        model.activation_budget)
    for i, ids in enumerate(id_batches):
        store[i] = first if i == 0 else model.embed(ids)
    return store


@torch.no_grad()
def replicate(model: CausalLM, store: HiddenStore, copies: int) -> HiddenStore:
    """A new store holding every batch of `store` repeated `copies` times along the batch axis."""
    if not len(store):
        return HiddenStore([], torch.float32, model.device, 0)
    first = store[0].repeat(copies, 1, 1)
    out = HiddenStore([(s[0] * copies, *s[1:]) for s in store.shapes], first.dtype, model.device,
                      model.activation_budget)
    for b in range(len(store)):
        out[b] = first if b == 0 else store[b].repeat(copies, 1, 1)
    return out


@torch.no_grad()
def run_layers(model: CausalLM, store: HiddenStore, start: int, stop: int,
               masks: Callable[[int], dict] | dict | None = None, before_batch: Callable[[int], None] | None = None,
               observer=None, on_step: StepFn | None = None, out: HiddenStore | None = None) -> HiddenStore:
    """Layers [start, stop) for every batch of `store`, layer-major, updating it in place, or, for
    one layer, writing into `out` and leaving `store` as it was (a checkpoint stays valid while the
    layer runs). `masks` is one dict for all batches or a function of the batch index."""
    if out is not None and stop != start + 1:
        raise ValueError("run_layers writes into `out` one layer at a time")
    dst = store if out is None else out
    for layer in range(start, stop):
        for b in range(len(store)):
            if before_batch is not None:
                before_batch(b)
            m = masks(b) if callable(masks) else masks
            dst[b] = model.run_layers(store[b], layer, layer + 1, masks=m, observer=observer)
            if on_step is not None:
                on_step(layer, b)
    return dst


@torch.no_grad()
def row_nll(model: CausalLM, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL (nats, float64) per row of a right-padded batch: h [B, S, D] -> [B]."""
    ids, mask = ids.to(h.device), mask.to(h.device)
    pred = mask[:, 1:]  # [B, S-1] positions whose next token is real
    rows = torch.arange(ids.shape[0], device=h.device)[:, None].expand_as(pred)[pred]  # [N]
    nll = token_nll(model, h[:, :-1][pred], ids[:, 1:][pred])  # [N]
    return torch.zeros(ids.shape[0], dtype=torch.float64, device=h.device).index_add_(0, rows, nll)


def variant_masks(model: CausalLM, mask_sets: list[dict]) -> Callable[[int], dict]:
    """For a batch of T tokens replicated once per variant: the masks that route copy c by
    mask_sets[c]. A layer all variants route alike keeps its one [E] mask; the others get one row
    per token, [C*T, E]. Built once per token count, not per layer and batch."""
    ids = model.expert_ids()
    shared, differing = {}, {}
    for layer in sorted({i for ms in mask_sets for i in ms}):
        full = torch.ones(len(ids[layer]), dtype=torch.bool, device=model.device)
        per_copy = torch.stack([ms.get(layer, full) for ms in mask_sets])  # [C, E]
        if bool((per_copy == per_copy[0]).all()):
            shared[layer] = per_copy[0]
        else:
            differing[layer] = per_copy
    built: dict[int, dict] = {}

    def for_tokens(tokens: int) -> dict:
        if tokens not in built:
            built[tokens] = {**shared, **{i: m.repeat_interleave(tokens, dim=0) for i, m in differing.items()}}
        return built[tokens]

    return for_tokens


@torch.no_grad()
def batch_nll(model: CausalLM, id_batches: list[torch.Tensor], pad_masks: list[torch.Tensor],
              mask_sets: list[dict] | None = None, on_step: StepFn | None = None) -> list[list[torch.Tensor]]:
    """Per-row NLL sums [B] of every batch, once per routing variant of `mask_sets` (each a dict
    layer -> [E] bool; default: one unmasked variant). Several variants share one pass: every
    batch is replicated once per variant, so each layer is read once for all of them (the prune
    report's before/after). Returns [variant][batch] -> [B]."""
    mask_sets = mask_sets or [{}]
    C = len(mask_sets)
    inputs = [ids.repeat(C, 1) for ids in id_batches] if C > 1 else id_batches
    store = embed_batches(model, inputs)
    if C > 1:
        for_tokens = variant_masks(model, mask_sets)
        masks = lambda b: for_tokens(id_batches[b].numel())  # noqa: E731
    else:
        masks = mask_sets[0]
    out: list[list[torch.Tensor]] = [[] for _ in range(C)]
    try:
        run_layers(model, store, 0, model.num_layers, masks=masks, on_step=on_step)
        for b in range(len(store)):
            rows = row_nll(model, store[b], inputs[b], pad_masks[b].repeat(C, 1)).cpu()  # [C*B]
            for c, part in enumerate(rows.view(C, -1)):
                out[c].append(part)
    finally:
        store.close()
        model.release()
    return out
