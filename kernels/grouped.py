"""Grouped plain-torch MoE: tokens sorted by expert, one matmul per active expert.

This is the runtime's default path (and the one autograd trains through): no Python loop over
tokens, only over experts that received at least one token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_by_expert(experts: torch.Tensor, num_experts: int):
    """Flatten [T, K] assignments and sort them by expert.

    Returns (order [T*K] positions into the flattened assignments, counts [E] int64).
    """
    flat = experts.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def grouped_moe(
    x: torch.Tensor,  # [T, D]
    experts: torch.Tensor,  # [T, K]
    weights: torch.Tensor,  # [T, K]
    w_gate: torch.Tensor,  # [E, F, D]
    w_up: torch.Tensor,  # [E, F, D]
    w_down: torch.Tensor,  # [E, D, F]
    return_norms: bool = False,
):
    """Returns y [T, D]; with `return_norms`, also ||expert output|| per slot [T, K] (unweighted),
    which profiling needs for REAP/EASY-EP saliency without running the experts twice."""
    T, K = experts.shape
    E = w_gate.shape[0]
    order, counts = sort_by_expert(experts, E)
    token_of = order // K  # [T*K] source token of each sorted assignment
    xs = x.index_select(0, token_of)  # [T*K, D]
    chunks = xs.split(counts.tolist())
    # unbind once: indexing w[e] per expert would make backward allocate a full-size gradient each time
    gates, ups, downs = w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0)
    outs = []
    for e, xe in enumerate(chunks):
        if xe.shape[0] == 0:
            continue
        h = F.silu(xe @ gates[e].t()) * (xe @ ups[e].t())  # [n_e, F]
        outs.append(h @ downs[e].t())  # [n_e, D]
    out = torch.zeros_like(x)
    if not outs:
        return (out, torch.zeros(T, K, dtype=torch.float32, device=x.device)) if return_norms else out
    raw = torch.cat(outs)  # [T*K, D] in expert order
    ys = raw * weights.reshape(-1)[order].unsqueeze(1).to(x.dtype)
    out = out.index_add(0, token_of, ys)
    if not return_norms:
        return out
    norms = torch.empty(T * K, dtype=torch.float32, device=x.device)
    norms[order] = raw.float().norm(dim=1)
    return out, norms.view(T, K)
