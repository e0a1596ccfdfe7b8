"""Multiple-choice scoring by log-likelihood (lm-eval's acc / acc_norm protocol).

A JSONL row {"question": Q, "choices": [...], "answer": index or letter} is scored by the summed
log-probability of each continuation " " + choice after the context: the item's in-context
examples (--shots) and Q, tokenized together, so the choice tokens are those of context + " " +
choice after the context's own tokens. `acc` picks the highest sum;
`acc_norm` divides it by the choice's length in UTF-8 bytes first.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from emo_cli.data.documents import data_files, load_table
from emo_cli.data.mc_items import MCItem, is_mc_table, mc_item, with_shots
from emo_cli.errors import EmoError
from emo_cli.model.api import masks_for
from emo_cli.model.distributed import world
from emo_cli.model.passes import embed_batches, run_layers


def is_multiple_choice(path: str) -> bool:
    files = data_files(Path(path))
    return is_mc_table(load_table(files[0]).column_names)


def read_mc_items(path: str, max_items: int | None = None, shots: int = 0) -> list[MCItem]:
    """The items of a multiple-choice file, each preceded by `shots` solved items of the same
    file (mc_items.with_shots: seeded, never the item itself)."""
    items = []
    for f in data_files(Path(path)):
        items += [mc_item(row, f"{f}: item {n}") for n, row in enumerate(load_table(f), 1)]
    if not items:
        raise EmoError(f"{path}: no multiple-choice items")
    return with_shots(items, shots)[:max_items]


def continuation_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[:len(ctx)] != ctx:  # the boundary merged into one token: score from the first difference
        i = 0
        while i < min(len(ctx), len(whole)) and ctx[i] == whole[i]:
            i += 1
        ctx = whole[:i]
    return whole[:len(ctx)], whole[len(ctx):]


def _rows(tokenizer, items: list[MCItem], seq_len: int) -> list[tuple[list[int], int]]:
    """One row per (item, choice): the token ids and how many trailing ones are the choice."""
    rows = []
    for it in items:
        for c in it.choices:
            ctx, cont = continuation_ids(tokenizer, it.context, " " + c)
            if not cont:
                raise EmoError(f"choice {c!r} tokenizes to nothing")
            ids = (ctx + cont)[-seq_len:]
            rows.append((ids, min(len(cont), len(ids) - 1)))
    return rows


@torch.no_grad()
def score_rows(model, pad_id: int, rows: list[tuple[list[int], int]], batch_size: int = 16, on_step=None,
               kept: dict | None = None) -> list[tuple[float, bool]]:
    """For each (ids, n) row: the summed log-probability of its last n tokens given the ones
    before, and whether each of them is the argmax (lm-eval's loglikelihood), in one layer-major
    pass; with `kept`, routing is restricted to those original expert ids."""
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r][0]), r))  # similar lengths together
    groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    w = world()
    groups = [groups[i] for i in w.mine(len(groups))]  # data parallel: this rank's share
    id_batches = []
    for g in groups:
        batch = torch.full((len(g), len(rows[g[0]][0])), pad_id, dtype=torch.long)  # [B, S]
        for j, r in enumerate(g):
            batch[j, :len(rows[r][0])] = torch.tensor(rows[r][0])
        id_batches.append(batch)
    step = (lambda layer, b: on_step(layer, len(groups[b]), 0)) if on_step else None
    store = embed_batches(model, id_batches)
    scores: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    try:
        run_layers(model, store, 0, model.num_layers, masks=masks_for(model, kept), on_step=step)
        for g, h in zip(groups, (store[b] for b in range(len(store)))):
            for j, r in enumerate(g):
                ids, n = rows[r]
                pos = torch.arange(len(ids) - n - 1, len(ids) - 1)
                logp = F.log_softmax(model.logits(h[j, pos]).double(), dim=-1)  # [n, V]
                target = torch.tensor(ids[len(ids) - n:])
                scores[r] = (float(logp[torch.arange(n), target].sum()), bool((logp.argmax(-1) == target).all()))
    finally:
        store.close()
        model.release()
    if w.size > 1:  # each row was scored on one rank (others hold 0): the sum is exact
        sums, greedy = w.sum([s for s, _ in scores], [float(g) for _, g in scores])
        scores = [(s, g > 0) for s, g in zip(sums.tolist(), greedy.tolist())]
    return scores


def choice_logprobs(model, tokenizer, items: list[MCItem], seq_len: int, batch_size: int = 16,
                    on_step=None, kept: dict | None = None) -> list[list[float]]:
    """Summed log-probability of every choice of every item, in one layer-major pass; with
    `kept`, routing is restricted to those original expert ids (= the slim model's scores)."""
    scores = [s for s, _ in score_rows(model, tokenizer.pad_id, _rows(tokenizer, items, seq_len), batch_size,
                                       on_step, kept)]
    out, k = [], 0
    for it in items:
        out.append(scores[k:k + len(it.choices)])
        k += len(it.choices)
    return out


def evaluate_mc(model, tokenizer, items: list[MCItem], seq_len: int = 2048, on_step=None,
                kept: dict | None = None) -> dict:
    correct = correct_norm = 0
    for it, lp in zip(items, choice_logprobs(model, tokenizer, items, seq_len, on_step=on_step, kept=kept)):
        norm = [v / max(len(c.encode("utf-8")), 1) for v, c in zip(lp, it.choices)]
        correct += int(max(range(len(lp)), key=lambda j: (lp[j], -j)) == it.answer)
        correct_norm += int(max(range(len(norm)), key=lambda j: (norm[j], -j)) == it.answer)
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "items": n}
