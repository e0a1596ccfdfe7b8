"""The one routing function of emo, shared by inference, profiling, selection, pretraining and kernels.

Shape legend: T tokens, E experts of the layer (shared included), K = top-k slots per token.

Three paths, exactly as the released EMO code:
  * always-active experts (take precedence): one fp32 softmax over all E; the always-active
    experts are excluded from the top-(k-|AA|) choice and then prepended with their own
    softmax probability as weight.
  * legacy shared experts (the last `num_shared` indices): separate fp32 softmaxes over the
    routed and the shared logits; top-(k-ns) routed plus top-ns shared; no renormalisation, so a
    single shared expert always has weight exactly 1.0.
  * plain: softmax over E, top-k, optional renormalisation (`norm_topk_prob`).

`allowed` masks router logits to -inf before the softmax. Removing experts from a layer is exactly
the same operation (docs/design.md#the-masking-identity), so masking is how emo evaluates a subset without
slicing it, and how the EMO document pool is imposed during pretraining.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RoutingSpec:
    num_experts: int  # E, shared included
    top_k: int  # slots per token, shared included
    num_shared: int = 0  # legacy path: the last `num_shared` indices
    always_active: tuple[int, ...] = ()
    norm_topk_prob: bool = False

    @property
    def num_routed(self) -> int:
        """Experts chosen by the router (the shared ones are not)."""
        if self.always_active:
            return self.num_experts
        return self.num_experts - self.num_shared


@dataclass
class Routing:
    probs: torch.Tensor  # [T, E] fp32 routing probabilities (shared columns: their own softmax)
    weights: torch.Tensor  # [T, K] fp32 weights applied to the expert outputs
    experts: torch.Tensor  # [T, K] int64 local expert indices


def route(logits: torch.Tensor, spec: RoutingSpec, allowed: torch.Tensor | None = None,
          softmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Routing:
    """Route tokens given raw router logits [T, E]; `allowed` is an optional bool mask, [E] for
    one subset or [T, E] per token (the EMO document pool in pretraining). `softmax` (over the last
    dimension) replaces torch's where an engine must round as llama.cpp does (the CPU kernels)."""
    logits = logits.float()
    if softmax is None:
        softmax = _softmax_last
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    E, k = spec.num_experts, spec.top_k
    if spec.always_active:
        aa = torch.tensor(spec.always_active, device=logits.device)
        probs = softmax(logits)  # [T, E]
        chooser = probs.index_fill(1, aa, float("-inf"))
        w_r, e_r = torch.topk(chooser, k - len(aa), dim=-1)
        w_r = probs.gather(1, e_r)
        e_aa = aa.expand(logits.shape[0], -1)
        weights = torch.cat([probs.gather(1, e_aa), w_r], dim=1)
        experts = torch.cat([e_aa, e_r], dim=1)
    elif spec.num_shared > 0:
        ns, er = spec.num_shared, E - spec.num_shared
        p_r = softmax(logits[:, :er])  # [T, E-ns]
        p_s = softmax(logits[:, er:])  # [T, ns]
        w_r, e_r = torch.topk(p_r, k - ns, dim=-1)
        w_s, e_s = torch.topk(p_s, ns, dim=-1)
        probs = torch.cat([p_r, p_s], dim=1)
        weights = torch.cat([w_r, w_s], dim=1)
        experts = torch.cat([e_r, e_s + er], dim=1)
    else:
        probs = softmax(logits)
        weights, experts = torch.topk(probs, k, dim=-1)
        if spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(probs=probs, weights=weights, experts=experts)


def routed_mask(spec: RoutingSpec, device=None) -> torch.Tensor:
    """[E] bool: experts chosen by the router (False for legacy shared / always-active ones)."""
    m = torch.ones(spec.num_experts, dtype=torch.bool, device=device)
    if spec.always_active:
        m[list(spec.always_active)] = False
    elif spec.num_shared:
        m[spec.num_experts - spec.num_shared :] = False
    return m


def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    return F.softmax(x, dim=-1)
