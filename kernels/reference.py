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


def q8_0_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the quantized CPU matmuls see it (float64): Q8_0 blocks of 32 values.

    Per block: amax = max|x|, scale d = fp16(amax / 127), q = round-half-even(x * (127 / amax))
    computed in fp32; value = q * d. This is llama.cpp's activation format for Q8_0/Q4_0 weights.
    """
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)  # torch.round rounds half to even
    return (q.double() * (amax / 127).half().double()).reshape(x.shape)


def q8_k_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as K-quant weights' matmuls see it (float64): Q8_K blocks of 256 values.

    Per block: m = the value of largest magnitude (the first on ties), iscale = -127 / m and
    q = min(127, round-half-even(iscale * x)) in fp32, scale d = 1 / iscale (fp32); value = q * d.
    """
    xb = x.float().reshape(*x.shape[:-1], -1, 256)
    first = xb.abs().argmax(-1, keepdim=True)  # torch returns the first maximal index
    m = torch.gather(xb, -1, first)
    # tensor / tensor: a Python scalar divided by a tensor is computed as a reciprocal times the
    # scalar, rounded twice, an ulp away from C's division
    iscale = torch.where(m != 0, torch.full_like(m, -127.0) / m, torch.zeros_like(m))
    q = torch.round(xb * iscale).clamp(max=127)
    d = torch.where(m != 0, torch.ones_like(m) / iscale, torch.zeros_like(m))
    return (q.double() * d.double()).reshape(x.shape)


def bf16_activations(x: torch.Tensor) -> torch.Tensor:
    """x as BF16 weights' matmuls see it: rounded to bf16 (nearest even)."""
    return x.bfloat16().double()


def f16_activations(x: torch.Tensor) -> torch.Tensor:
    """x as F16 weights' matmuls see it: rounded to fp16 (nearest even)."""
    return x.half().double()


def reference_moe_rounded(x, experts, weights, w_gate, w_up, w_down, act_in, act_mid) -> torch.Tensor:
    """`reference_moe` with the matmul inputs rounded like a kernel rounds them: `act_in` on x
    before gate/up, `act_mid` on silu(gate) * up before down (e.g. q8_0_activations)."""
    x64 = act_in(x.double())
    out = torch.zeros_like(x64)
    for k in range(experts.shape[1]):
        e = experts[:, k]
        g = torch.einsum("tfd,td->tf", w_gate[e].double(), x64)
        u = torch.einsum("tfd,td->tf", w_up[e].double(), x64)
        h = act_mid((g * torch.sigmoid(g) * u).float()).double()  # the kernel keeps h in fp32
        y = torch.einsum("tdf,tf->td", w_down[e].double(), h)
        out += weights[:, k].double().unsqueeze(1) * y
    return out
