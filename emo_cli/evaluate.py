"""Held-out language-model loss, perplexity and bits per byte, defined so results are comparable.

Each document is tokenized alone (no BOS, no special tokens) and truncated to `seq_len` tokens;
positions 1..n-1 are predicted from their prefix. `loss` is the token-weighted mean NLL in nats
over all documents, `ppl` = exp(loss), and `bits_per_byte` = total NLL in bits / UTF-8 bytes of the
scored text (the whole document, or the decoded kept tokens when it was truncated).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data import Document, make_batches, tokenize_documents

HEAD_CHUNK = 2048  # tokens per lm_head slice: bounds the [N, V] logits buffer


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


def scored_bytes(tokenizer, doc: Document, ids: list[int], full_len: int) -> int:
    if len(ids) == full_len:
        return len(doc.text.encode("utf-8"))
    return len(tokenizer.decode(ids).encode("utf-8"))


@torch.no_grad()
def nll_per_document(model, batch_ids: torch.Tensor, batch_mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL (nats, float64) per row of a right-padded batch [B, S] -> [B]."""
    device = model.device
    ids, mask = batch_ids.to(device), batch_mask.to(device)
    h = model.hidden_states(ids)  # [B, S, D]
    pred = mask[:, 1:]  # [B, S-1] positions whose next token is real
    hs = h[:, :-1][pred]  # [N, D]
    targets = ids[:, 1:][pred]  # [N]
    rows = torch.arange(ids.shape[0], device=device)[:, None].expand_as(pred)[pred]  # [N]
    out = torch.zeros(ids.shape[0], dtype=torch.float64, device=device)
    for s in range(0, hs.shape[0], HEAD_CHUNK):
        logits = model.logits_from_hidden(hs[s:s + HEAD_CHUNK])  # [n, V] fp32
        nll = F.cross_entropy(logits, targets[s:s + HEAD_CHUNK], reduction="none").double()
        out.index_add_(0, rows[s:s + HEAD_CHUNK], nll)
    return out


def evaluate_loss(model, tokenizer, docs: list[Document], seq_len: int = 2048, batch_size: int = 8,
                  on_batch=None) -> LossResult:
    """Score `docs` with `model`; `on_batch(n_docs, n_tokens)` reports progress."""
    full = tokenizer.encode_batch([d.text for d in docs])
    toks = [t[:seq_len] for t in full]
    batches = make_batches(toks, docs, batch_size, tokenizer.pad_id)
    pos = {d.index: i for i, d in enumerate(docs)}
    nll_sum, tokens, nbytes, ndocs = 0.0, 0, 0, 0
    for b in batches:
        per_doc = nll_per_document(model, b.ids, b.mask)
        nll_sum += float(per_doc.sum())
        for di in b.doc_index:
            i = pos[di]
            tokens += len(toks[i]) - 1
            nbytes += scored_bytes(tokenizer, docs[i], toks[i], len(full[i]))
            ndocs += 1
        if on_batch:
            on_batch(len(b.doc_index), int(b.mask.sum()))
    loss = nll_sum / max(tokens, 1)
    return LossResult(loss=loss, ppl=math.exp(loss) if loss < 700 else float("inf"),
                      bits_per_byte=nll_sum / math.log(2) / max(nbytes, 1), tokens=tokens, docs=ndocs,
                      nll_sum=nll_sum, bytes=nbytes)
