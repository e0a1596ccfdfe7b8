"""The oracle: the routed SwiGLU mixture computed slot by slot, in float64, with no grouping.

Deliberately naive and independent of every optimised kernel; kernels are tested against it.
"""

from __future__ import annotations

import torch


def reference_moe(x, experts, weights, w_gate, w_up, w_down) -> torch.Tensor:
    """x [T, D], experts/weights [T, K], w_gate/w_up [E, F, D], w_down [E, D, F] -> [T, D] float64."""
    x64 = x.double()
    out = torch.zeros_like(x64)
    T, K = experts.shape
    for k in range(K):
        e = experts[:, k]  # [T]
        g = torch.einsum("tfd,td->tf", w_gate[e].double(), x64)
        u = torch.einsum("tfd,td->tf", w_up[e].double(), x64)
        h = g * torch.sigmoid(g) * u  # [T, F]
        y = torch.einsum("tdf,tf->td", w_down[e].double(), h)
        out += weights[:, k].double().unsqueeze(1) * y
    return out
