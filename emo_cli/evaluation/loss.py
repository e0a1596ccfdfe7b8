"""Held-out language-model loss, perplexity and bits per byte, defined so results are comparable.

Each document is tokenized alone (no BOS, no special tokens) and truncated to `seq_len` tokens;
positions 1..n-1 are predicted from their prefix. `loss` is the token-weighted mean NLL in nats
over all documents, `ppl` = exp(loss), and `bits_per_byte` = total NLL in bits / UTF-8 bytes of the
scored text (the whole document, or the decoded kept tokens when it was truncated).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from emo_cli.data.documents import Document, make_batches
from emo_cli.errors import EmoError
from emo_cli.model.distributed import world
from emo_cli.model.passes import batch_nll


@dataclass
class LossResult:
    loss: float
    ppl: float
    bits_per_byte: float
    tokens: int
    docs: int
    nll_sum: float
    bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def scored_bytes(tokenizer, doc: Document, ids: list[int], whole: bool) -> int:
    if whole:
        return len(doc.text.encode("utf-8"))
    return len(tokenizer.decode(ids).encode("utf-8"))


def evaluate_loss(model, tokenizer, docs: list[Document], seq_len: int = 2048, batch_size: int = 8,
                  masks: dict | None = None, on_step=None) -> LossResult:
    """Score `docs` with `model`, routing masked by `masks` (layer -> [E] bool)."""
    return evaluate_losses(model, tokenizer, docs, [masks or {}], seq_len, batch_size, on_step)[0]


def evaluate_losses(model, tokenizer, docs: list[Document], mask_sets: list[dict], seq_len: int = 2048,
                    batch_size: int = 8, on_step=None) -> list[LossResult]:
    """Score `docs` once per routing variant in `mask_sets`, all in one layer-major pass;
    `on_step(layer, n_docs, n_tokens)` reports progress after each batch of each layer."""
    if seq_len < 2:
        raise EmoError("--seq-len must be at least 2")
    encoded = tokenizer.encode_prefixes([d.text for d in docs], seq_len)
    toks = [ids for ids, _ in encoded]
    batches = make_batches(toks, docs, batch_size, tokenizer.pad_id)
    w = world()
    batches = [batches[i] for i in w.mine(len(batches))]  # data parallel: this rank's share
    step = None
    if on_step:
        def step(layer, b):
            on_step(layer, len(batches[b].doc_index), int(batches[b].mask.sum()))
    per_variant = batch_nll(model, [b.ids for b in batches], [b.mask for b in batches], mask_sets, on_step=step)
    pos = {d.index: i for i, d in enumerate(docs)}
    tokens, nbytes, ndocs = 0, 0, 0
    for b in batches:
        for di in b.doc_index:
            i = pos[di]
            tokens += len(toks[i]) - 1
            nbytes += scored_bytes(tokenizer, docs[i], toks[i], encoded[i][1])
            ndocs += 1
    sums = [sum(float(per_doc.sum()) for per_doc in per_batch) for per_batch in per_variant]
    if w.size > 1:  # every rank gets the totals, so every rank takes the same decisions on them
        reduced, counts = w.sum(sums, [tokens, nbytes, ndocs])
        sums, (tokens, nbytes, ndocs) = reduced.tolist(), (int(v) for v in counts.tolist())
    results = []
    for nll_sum in sums:
        loss = nll_sum / max(tokens, 1)
        results.append(LossResult(loss=loss, ppl=math.exp(loss) if loss < 700 else float("inf"),
                                  bits_per_byte=nll_sum / math.log(2) / max(nbytes, 1), tokens=tokens,
                                  docs=ndocs, nll_sum=nll_sum, bytes=nbytes))
    return results
