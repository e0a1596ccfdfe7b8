"""Data-driven expert selection: EMO's layerwise `router` method and loss-guided `greedy` search.

Both exploit the identity "pruning = masking router logits", so they never copy weights: a layer is
pruned by a routing mask, and the residual stream at the current layer's input is cached for every
document, so each layer is computed once per candidate instead of from the embeddings. Both are
layer-major passes through the model interface (model/passes.py), so they run on a layer-streamed model
unchanged; greedy scores a whole round of candidate swaps in one pass over layers l..L-1, so a
streamed model reads each of those layers once per round.

router (docs/design.md#selection-methods)
    For l = 0..L-1, with layers < l already pruned: mean routing probability of the routed experts
    over all (non-pad) tokens at layer l; keep the top ones. EMO's script re-runs layers 0..l for
    every l (sum_l (l+1) = L(L+1)/2 layer passes, 8.5 forwards for L=16); with the cached residual
    stream this is exactly one forward pass (no lm_head).

greedy (held-out loss, emo's own)
    1. Seeds: the plans of the methods marked `seeds_greedy` in experts/methods.py and router's;
       each is scored by the real held-out LM loss (one forward each, + 1 to make router's plan)
       and the best becomes the incumbent.
    2. Layer by layer (l = 0..L-1), with the residual stream at layer l's input cached under the
       incumbent: candidate swaps (drop one of the `shortlist` weakest kept routed experts, add one of
       the `shortlist` strongest dropped ones, ranked by the profile's cheap scores) are scored by the
       held-out loss, running only layers l..L-1 and the head: (L-l)/L of a forward each. Candidates
       are evaluated together (the cached inputs replicated, one routing mask per copy). The best
       swap is accepted when it lowers the loss by more than `min_gain` (relative), and the layer
       is searched again until no swap helps; then the cache advances one layer.
    Cost in forward-pass equivalents over the held-out set: the seed evaluations (4 today) + 1
    router pass + sum over evaluated swaps of (L-l)/L. --max-evals bounds the swaps and is spread
    evenly over the layers (unused budget carries to later layers): the default 256 on 16 layers is
    one round of 16 swaps per layer, at most 256 x 0.53 = 136 forwards (plus the 5).
"""

from __future__ import annotations

import math

import torch

from emo_cli.errors import EmoError
from emo_cli.experts.methods import METHODS, routing_mass_scores
from emo_cli.experts.selection import Budget, Plan, combined_scores, layer_budgets, plan_from_scores, score_plan
from emo_cli.experts.usage_profile import Profile
from emo_cli.model.api import expert_mask, masks_for
from emo_cli.model.distributed import world
from emo_cli.model.passes import batch_nll, embed_batches, replicate, row_nll, run_layers, variant_masks


@torch.no_grad()
def router_plan(model, batches, profiles: list[Profile], budget: Budget, allocation: str, top_k: int,
                on_layer=None) -> Plan:
    """EMO's layerwise Router method with a cached residual stream (one forward in total)."""
    base = profiles[0]
    keep = layer_budgets(base, budget, top_k)
    if allocation == "global":  # per-layer counts from the profile's mass, ranks from the layerwise pass
        prob_scores = {l: combined_scores(profiles, routing_mass_scores, l) for l in keep}
        keep = {l: len(v) for l, v in plan_from_scores(base, prob_scores, keep, "global").items()}
    expert_ids = model.expert_ids()
    kept: dict[int, list[int]] = {}
    scores: dict[int, dict[int, float]] = {}
    w = world()
    batches = [batches[i] for i in w.mine(len(batches))]  # data parallel: sums reduced per layer
    store = embed_batches(model, [b.ids for b in batches])
    try:
        for layer in range(model.num_layers):
            ids = expert_ids[layer]
            masks = {}
            if ids is not None and layer in keep:
                total = torch.zeros(len(ids), dtype=torch.float64)
                ntok = 0
                for i, b in enumerate(batches):
                    m = b.mask.reshape(-1).to(model.device)
                    total += model.router_probs(store[i], layer)[m].double().sum(0).cpu()  # [E]
                    ntok += int(m.sum())
                if w.size > 1:
                    total, ntok = w.sum(total, ntok)
                mean = total / max(ntok, 1)
                fixed = base.fixed_ids(layer)
                routed = [e for e in ids if e not in set(fixed)]
                ranked = sorted(routed, key=lambda e: (float(mean[ids.index(e)]), -e), reverse=True)
                kept[layer] = sorted(fixed + ranked[: keep[layer] - len(fixed)])
                scores[layer] = {e: float(mean[ids.index(e)]) for e in routed}
                masks = {layer: expert_mask(ids, kept[layer]).to(model.device)}
            run_layers(model, store, layer, layer + 1, masks=masks)
            if on_layer:
                on_layer(layer)
    finally:
        store.close()
        model.release()
    return Plan(kept=kept, method="router", budget=budget.text, allocation=allocation,
                model_fingerprint=base.fingerprint, scores=scores)


# ---- held-out loss from a cached layer input ------------------------------------------------------
@torch.no_grad()
def _candidate_losses(model, layer: int, store, batches, masks: dict, candidate_masks) -> list[float]:
    """Held-out loss (nats/token) of each candidate mask [E] for `layer`, running layers
    layer..L-1 and the head from the cached inputs of `layer` in `store`, the other layers masked
    by `masks`. All candidates share one pass: each batch is replicated once per candidate, with
    one routing mask per copy ([C*B*S, E], a row per token), so each layer is read once."""
    C = len(candidate_masks)
    work = replicate(model, store, C)
    for_tokens = variant_masks(model, [{**masks, layer: m} for m in candidate_masks])
    nll = torch.zeros(C, dtype=torch.float64)
    ntok = 0
    try:
        run_layers(model, work, layer, model.num_layers, masks=lambda b: for_tokens(batches[b].ids.numel()))
        for i, b in enumerate(batches):
            rows = row_nll(model, work[i], b.ids.repeat(C, 1), b.mask.repeat(C, 1))  # [C*B]
            nll += rows.view(C, -1).sum(1).cpu()
            ntok += int(b.mask[:, 1:].sum())
    finally:
        work.close()
    w = world()
    if w.size > 1:  # this rank scored its share of the held-out batches: every rank gets the totals
        nll, ntok = w.sum(nll, ntok)
    return (nll / max(ntok, 1)).tolist()


def plan_loss(model, plan: Plan, batches) -> float:
    """Held-out loss (nats/token) with routing masked to the plan (= the slim model's loss)."""
    w = world()
    batches = [batches[i] for i in w.mine(len(batches))]  # data parallel: this rank's share
    (per_batch,) = batch_nll(model, [b.ids for b in batches], [b.mask for b in batches], [masks_for(model, plan.kept)])
    ntok = sum(int(b.mask[:, 1:].sum()) for b in batches)
    nll = float(sum(float(x.sum()) for x in per_batch))
    if w.size > 1:
        nll, ntok = (float(v) for v in w.sum(nll, ntok))
    return nll / max(ntok, 1)


@torch.no_grad()
def greedy_plan(model, calib_batches, heldout_batches, profiles: list[Profile], budget: Budget,
                allocation: str, top_k: int, max_evals: int = 256, shortlist: int = 4,
                min_gain: float = 1e-4, candidates_per_pass: int = 16, on_eval=None) -> Plan:
    if not heldout_batches:
        raise EmoError("greedy needs held-out documents: profile with --heldout-frac > 0 or pass --heldout DATA")
    base = profiles[0]
    seeds = [score_plan(profiles, m.name, budget, allocation, top_k) for m in METHODS if m.seeds_greedy]
    seeds.append(router_plan(model, calib_batches, profiles, budget, allocation, top_k))
    seed_losses = {}
    for p in seeds:
        seed_losses[p.method] = plan_loss(model, p, heldout_batches)
        if on_eval:
            on_eval(1.0)
    best = min(seeds, key=lambda p: (seed_losses[p.method], p.method))
    kept = {l: list(v) for l, v in best.kept.items()}
    current = seed_losses[best.method]
    cheap = {l: combined_scores(profiles, routing_mass_scores, l) for l in kept}
    evals, accepted, fwd_equiv = 0, [], float(len(seeds))
    expert_ids = model.expert_ids()
    L = model.num_layers
    moe_left = len(kept)
    w = world()
    heldout_batches = [heldout_batches[i] for i in w.mine(len(heldout_batches))]  # losses reduced per pass
    store = embed_batches(model, [b.ids for b in heldout_batches])
    try:
        for layer in range(L):
            ids = expert_ids[layer]
            searching = ids is not None and layer in kept
            # spread the evaluation budget over the layers still to search; unused budget carries on
            layer_cap = evals + max(1, (max_evals - evals) // max(moe_left, 1))
            if searching:
                moe_left -= 1
            while searching and evals < layer_cap:
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
                    cands = [expert_mask(ids, [e for e in kept[layer] if e != o] + [i]).to(model.device)
                             for o, i in group]
                    losses = _candidate_losses(model, layer, store, heldout_batches, masks_for(model, kept), cands)
                    results += list(zip(losses, group))
                    evals += len(group)
                    fwd_equiv += len(group) * (L - layer) / L
                    if on_eval:
                        on_eval(len(group) * (L - layer) / L)
                loss, (o, i) = min(results)
                if loss < current * (1 - min_gain):
                    kept[layer] = sorted([e for e in kept[layer] if e != o] + [i])
                    accepted.append({"layer": layer, "dropped": o, "added": i, "loss": loss})
                    current = loss
                else:
                    break
            run_layers(model, store, layer, layer + 1, masks=masks_for(model, kept))
    finally:
        store.close()
        model.release()
    return Plan(kept={l: sorted(v) for l, v in kept.items()}, method="greedy", budget=budget.text,
                allocation=allocation, model_fingerprint=base.fingerprint,
                scores={l: {e: float(v[0]) for e, v in s.items()} for l, s in cheap.items()},
                extra={"seed_losses": seed_losses, "start": best.method, "swaps": accepted,
                       "evals": evals, "forward_equivalents": round(fwd_equiv, 2),
                       "heldout_loss": current if math.isfinite(current) else None})
