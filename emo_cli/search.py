"""Data-driven expert selection: EMO's layerwise `router` method and loss-guided `greedy` search.

Both exploit the identity "pruning = masking router logits", so they never copy weights: a layer is
pruned by setting its routing mask, and the residual stream at the current layer's input is cached
for every document, so each layer is computed once per candidate instead of from the embeddings.

router (EMO_SPEC.md §4b)
    For l = 0..L-1, with layers < l already pruned: mean routing probability of the routed experts
    over all (non-pad) tokens at layer l; keep the top ones. EMO's script re-runs layers 0..l for
    every l (sum_l (l+1) = L(L+1)/2 layer passes, 8.5 forwards for L=16); with the cached residual
    stream this is exactly one forward pass (no lm_head).

greedy (held-out loss, emo's own)
    1. Seeds: the plans of frequency, reap, easyep and router; each is scored by the real held-out
       LM loss (4 forwards + 1 for router) and the best becomes the incumbent.
    2. Layer by layer (l = 0..L-1), with the residual stream at layer l's input cached under the
       incumbent: candidate swaps (drop one of the `shortlist` weakest kept routed experts, add one of
       the `shortlist` strongest dropped ones, ranked by the profile's cheap scores) are scored by the
       held-out loss, running only layers l..L-1 and the head: (L-l)/L of a forward each. Candidates
       are evaluated in batches (the cached inputs replicated, one routing mask per copy). The best
       swap is accepted when it lowers the loss by more than `min_gain` (relative), and the layer
       is searched again until no swap helps; then the cache advances one layer.
    Cost in forward-pass equivalents over the held-out set: 4 seed evaluations + 1 router pass +
    sum over evaluated swaps of (L-l)/L. --max-evals bounds the swaps and is spread evenly over the
    layers (unused budget carries to later layers): the default 256 on 16 layers is one round of
    16 swaps per layer, at most 256 x 0.53 = 136 forwards (plus the 5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import EmoError
from .evaluate import HEAD_CHUNK
from .profile import Profile
from .routing import route
from .select import Budget, Plan, combined_scores, layer_budgets, plan_from_scores, score_plan


def _mask_for(blk, kept_ids) -> torch.Tensor:
    keep = set(int(e) for e in kept_ids)
    return torch.tensor([e in keep for e in blk.expert_ids.tolist()], device=blk.router.device)  # [E]


@torch.no_grad()
def _embed(model, batches):
    return [model.embed_tokens(b.ids.to(model.device)) for b in batches]  # [B, S, D] per batch


@torch.no_grad()
def _advance(model, layer: int, hs):
    """Residual stream after `layer` for every cached batch (routing mask of that layer as set)."""
    out = []
    for h in hs:
        cos, sin = model.rope(h.shape[1])
        out.append(model.layers[layer](h, cos, sin, None, 0))
    return out


@torch.no_grad()
def router_plan(model, batches, profiles: list[Profile], budget: Budget, allocation: str, top_k: int,
                on_layer=None) -> Plan:
    """EMO's layerwise Router method with a cached residual stream (one forward in total)."""
    base = profiles[0]
    keep = layer_budgets(base, budget, top_k)
    if allocation == "global":  # per-layer counts from the profile's mass, ranks from the layerwise pass
        prob_scores = {l: combined_scores(profiles, "prob", l) for l in keep}
        keep = {l: len(v) for l, v in plan_from_scores(base, prob_scores, keep, "global").items()}
    blocks = model.moe_blocks()
    saved = {i: b.allowed for i, b in blocks.items()}
    kept: dict[int, list[int]] = {}
    scores: dict[int, dict[int, float]] = {}
    try:
        model.set_expert_mask(None)
        hs = _embed(model, batches)
        for layer in range(len(model.layers)):
            blk = blocks.get(layer)
            if blk is not None and layer in keep:
                ids = blk.expert_ids.tolist()
                total = torch.zeros(len(ids), dtype=torch.float64)
                ntok = 0
                for h, b in zip(hs, batches):
                    cos, sin = model.rope(h.shape[1])
                    mid = model.layers[layer].attend(h, cos, sin)
                    x = model.layers[layer].pre_feedforward_layernorm(mid).reshape(-1, h.shape[-1])
                    m = b.mask.reshape(-1).to(x.device)
                    probs = route(x[m] @ blk.router.t(), blk.spec).probs  # [N, E]
                    total += probs.double().sum(0).cpu()
                    ntok += int(m.sum())
                mean = total / max(ntok, 1)
                fixed = base.fixed_ids(layer)
                routed = [e for e in ids if e not in set(fixed)]
                ranked = sorted(routed, key=lambda e: (float(mean[ids.index(e)]), -e), reverse=True)
                kept[layer] = sorted(fixed + ranked[: keep[layer] - len(fixed)])
                scores[layer] = {e: float(mean[ids.index(e)]) for e in routed}
                blk.allowed = _mask_for(blk, kept[layer])
            hs = _advance(model, layer, hs)
            if on_layer:
                on_layer(layer)
    finally:
        for i, b in blocks.items():
            b.allowed = saved[i]
    return Plan(kept=kept, method="router", budget=budget.text, allocation=allocation,
                model_fingerprint=base.fingerprint, scores=scores)


# ---- held-out loss from a cached layer input ------------------------------------------------------
@torch.no_grad()
def _loss_from(model, layer: int, hs, batches, candidate_masks=None) -> list[float]:
    """Held-out loss (nats/token) running layers layer..L-1 from cached inputs.

    candidate_masks: list of C masks [E] for `layer` (evaluated together by replicating the batch);
    None evaluates the model's current masks once.
    """
    C = 1 if candidate_masks is None else len(candidate_masks)
    nll = torch.zeros(C, dtype=torch.float64)
    ntok = 0
    blk = model.moe_blocks().get(layer)
    saved = blk.allowed if blk is not None else None
    try:
        for h, b in zip(hs, batches):
            B, S, D = h.shape
            ids = b.ids.to(model.device)
            if candidate_masks is not None:
                per_copy = torch.stack(candidate_masks)  # [C, E]
                blk.allowed = per_copy.repeat_interleave(B * S, dim=0)  # [C*B*S, E] one mask per token
                h = h.repeat(C, 1, 1)
                ids = ids.repeat(C, 1)
            cos, sin = model.rope(S)
            for i in range(layer, len(model.layers)):
                h = model.layers[i](h, cos, sin, None, 0)
            pred = b.mask[:, 1:].to(model.device).repeat(C, 1)  # [C*B, S-1]
            hsel = h[:, :-1][pred]
            tgt = ids[:, 1:][pred]
            copy = torch.arange(C, device=h.device).repeat_interleave(B)[:, None].expand_as(pred)[pred]
            for s in range(0, hsel.shape[0], HEAD_CHUNK):
                lp = F.cross_entropy(model.logits_from_hidden(hsel[s:s + HEAD_CHUNK]), tgt[s:s + HEAD_CHUNK],
                                     reduction="none").double().cpu()
                nll.index_add_(0, copy[s:s + HEAD_CHUNK].cpu(), lp)
            ntok += int(b.mask[:, 1:].sum())
    finally:
        if blk is not None:
            blk.allowed = saved
    return (nll / max(ntok, 1)).tolist()


def plan_loss(model, plan: Plan, batches) -> float:
    model.set_expert_mask(plan.kept)
    try:
        return _loss_from(model, 0, _embed(model, batches), batches)[0]
    finally:
        model.set_expert_mask(None)


@torch.no_grad()
def greedy_plan(model, calib_batches, heldout_batches, profiles: list[Profile], budget: Budget,
                allocation: str, top_k: int, max_evals: int = 256, shortlist: int = 4,
                min_gain: float = 1e-4, candidates_per_pass: int = 8, on_eval=None) -> Plan:
    if not heldout_batches:
        raise EmoError("greedy needs held-out documents: profile with --heldout-frac > 0 or pass --heldout DATA")
    base = profiles[0]
    seeds = [score_plan(profiles, m, budget, allocation, top_k) for m in ("frequency", "reap", "easyep")]
    seeds.append(router_plan(model, calib_batches, profiles, budget, allocation, top_k))
    seed_losses = {}
    for p in seeds:
        seed_losses[p.method] = plan_loss(model, p, heldout_batches)
        if on_eval:
            on_eval(1.0)
    best = min(seeds, key=lambda p: (seed_losses[p.method], p.method))
    kept = {l: list(v) for l, v in best.kept.items()}
    current = seed_losses[best.method]
    cheap = {l: combined_scores(profiles, "prob", l) for l in kept}
    evals, accepted, fwd_equiv = 0, [], float(len(seeds))
    blocks = model.moe_blocks()
    L = len(model.layers)
    model.set_expert_mask(kept)
    moe_left = len(kept)
    try:
        hs = _embed(model, heldout_batches)
        for layer in range(L):
            blk = blocks.get(layer)
            # spread the evaluation budget over the layers still to search; unused budget carries on
            layer_cap = evals + max(1, (max_evals - evals) // max(moe_left, 1))
            if blk is not None and layer in kept:
                moe_left -= 1
            while blk is not None and layer in kept and evals < layer_cap:
                fixed = set(base.fixed_ids(layer))
                inside = [e for e in kept[layer] if e not in fixed]
                outside = [e for e in cheap[layer] if e not in set(kept[layer])]
                weak = sorted(inside, key=lambda e: cheap[layer][e])[:shortlist]
                strong = sorted(outside, key=lambda e: cheap[layer][e], reverse=True)[:shortlist]
                swaps = [(o, i) for o in weak for i in strong][: layer_cap - evals]
                if not swaps:
                    break
                results = []
                for s in range(0, len(swaps), candidates_per_pass):
                    group = swaps[s:s + candidates_per_pass]
                    masks = [_mask_for(blk, [e for e in kept[layer] if e != o] + [i]) for o, i in group]
                    results += list(zip(_loss_from(model, layer, hs, heldout_batches, masks), group))
                    evals += len(group)
                    fwd_equiv += len(group) * (L - layer) / L
                    if on_eval:
                        on_eval(len(group) * (L - layer) / L)
                loss, (o, i) = min(results)
                if loss < current * (1 - min_gain):
                    kept[layer] = sorted([e for e in kept[layer] if e != o] + [i])
                    blk.allowed = _mask_for(blk, kept[layer])
                    accepted.append({"layer": layer, "dropped": o, "added": i, "loss": loss})
                    current = loss
                else:
                    break
            hs = _advance(model, layer, hs)
    finally:
        model.set_expert_mask(None)
    return Plan(kept={l: sorted(v) for l, v in kept.items()}, method="greedy", budget=budget.text,
                allocation=allocation, model_fingerprint=base.fingerprint,
                scores={l: {e: float(v[0]) for e, v in s.items()} for l, s in cheap.items()},
                extra={"seed_losses": seed_losses, "start": best.method, "swaps": accepted,
                       "evals": evals, "forward_equivalents": round(fwd_equiv, 2),
                       "heldout_loss": current if math.isfinite(current) else None})
