"""The building blocks of emo's architectures: RMSNorm, NeoX rotary embeddings, grouped-query
attention with a KV cache, the dense MLP, and the routed MoE block with its experts stacked per layer.

Shape legend: B batch, S sequence, T = B*S tokens, D hidden, H heads, Hkv key-value heads,
hd head dim, E experts in the layer (shared included), F expert width, K top-k slots, V vocab.

Experts are stacked per layer (w_gate/w_up [E, F, D], w_down [E, D, F], router [E, D]) and the
ORIGINAL expert id of every row is kept in `expert_ids`, so a pruned model still knows which
experts of its parent it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from emo_cli.arch.routing import Routing, RoutingSpec, route
from emo_kernels.grouped import grouped_moe


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """NeoX-style rotary tables in fp32: cos/sin [S, hd] with the frequencies repeated twice."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rope_for(cfg, S: int, start: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, hd] for positions start..start+S-1."""
    return rope_cos_sin(torch.arange(start, start + S, device=device), cfg.head_dim, cfg.rope_theta)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, hd]; rotate_half pairs dimension i with i + hd/2."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype))


class KVCache:
    """Per-layer keys/values [B, Hkv, S, hd], preallocated and grown by doubling."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # tokens already cached (same for every layer after a full forward)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        need = start + k.shape[2]
        buf_k = self.k[layer]
        if buf_k is None or buf_k.shape[2] < need:
            cap = max(need, 2 * (buf_k.shape[2] if buf_k is not None else 64))
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = self.v[layer][:, :, :start]
            self.k[layer], self.v[layer] = new_k, new_v
        self.k[layer][:, :, start:need] = k
        self.v[layer][:, :, start:need] = v
        return self.k[layer][:, :, :need], self.v[layer][:, :, :need]

    def reset(self):
        self.length = 0


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q [B, H, S, hd] at positions start..start+S-1; k/v [B, Hkv, Sk, hd] cover positions 0..Sk-1.
    Returns o [B, H, S, hd]. Both runtimes (this model and the GGUF one) attend through here."""
    S, Sk = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # query head h reads kv head h // rep, as HF repeat_kv and ggml's broadcast
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if start == 0 and Sk == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if S == 1:  # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v)
    qpos = torch.arange(start, start + S, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.arange(Sk, device=q.device)[None, :] <= qpos)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.kv_heads, hd
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, D, bias=bias)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.hd).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)  # [B, Hkv, S, hd]
        v = self.v_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        o = causal_attention(q, k, v, start)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class DenseMLP(nn.Module):
    def __init__(self, D: int, F_: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(D, F_, bias=bias)
        self.up_proj = nn.Linear(D, F_, bias=bias)
        self.down_proj = nn.Linear(F_, D, bias=bias)

    def forward(self, x, **_):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class MoEObservation:
    """What one MoE layer saw in one forward: for profiling and selection."""

    layer: int
    x: torch.Tensor  # [T, D] post-norm input of the MoE block
    logits: torch.Tensor  # [T, E] raw router logits (before any mask)
    routing: Routing
    out: torch.Tensor  # [T, D] MoE output
    expert_norms: torch.Tensor | None  # [T, K] ||expert output|| per slot, unweighted


Observer = Callable[[MoEObservation], None]


DEFAULT_ACTIVATION_BUDGET = 2 * 1024**3  # hidden-state bytes a pass keeps in memory before spilling
MOE_CHUNK_TOKENS = 4096  # tokens per expert-kernel call (see MoEBlock.forward)


class MoEBlock(nn.Module):
    def __init__(self, cfg, layer: int, num_experts: int, num_shared: int,
                 always_active: tuple[int, ...]):
        super().__init__()
        D, F_ = cfg.hidden_size, cfg.intermediate_size
        self.layer = layer
        self.spec = RoutingSpec(num_experts=num_experts, top_k=min(cfg.num_experts_per_tok, num_experts),
                                num_shared=num_shared, always_active=always_active,
                                norm_topk_prob=cfg.norm_topk_prob)
        self.router = nn.Parameter(torch.empty(num_experts, D))  # [E, D]
        self.w_gate = nn.Parameter(torch.empty(num_experts, F_, D))  # [E, F, D]
        self.w_up = nn.Parameter(torch.empty(num_experts, F_, D))  # [E, F, D]
        self.w_down = nn.Parameter(torch.empty(num_experts, D, F_))  # [E, D, F]
        self.register_buffer("expert_ids", torch.arange(num_experts), persistent=True)  # [E] original ids
        self.allowed: torch.Tensor | None = None  # [E] bool routing mask (switching to a subset)
        self.pool_fn: Callable | None = None  # training-time EMO document pool, see lab/pretrain.py
        self.moe_fn: Callable = grouped_moe  # inference kernel, chosen by emo_kernels.dispatch

    def forward(self, x: torch.Tensor, observer: Observer | None = None, allowed: torch.Tensor | None = None,
                **pool_kw) -> torch.Tensor:
        """`allowed` ([E] or [T, E] bool) masks routing for this call; else the switched subset."""
        B, S, D = x.shape
        xt = x.reshape(-1, D)  # [T, D]
        logits = xt @ self.router.t()  # [T, E]
        if allowed is None:
            allowed = self.allowed
        if self.pool_fn is not None:
            allowed = self.pool_fn(self, logits, **pool_kw)  # [T, E] per-document pool
        r = route(logits, self.spec, allowed)
        # the kernels gather K copies of every token: at most MOE_CHUNK_TOKENS tokens per call keeps
        # that working set bounded however long the batch (routing is per token, so nothing changes)
        chunks = [slice(s, s + MOE_CHUNK_TOKENS) for s in range(0, xt.shape[0], MOE_CHUNK_TOKENS)] or [slice(0, 0)]

        def experts(fn, s, **kw):
            return fn(xt[s], r.experts[s], r.weights[s], self.w_gate, self.w_up, self.w_down, **kw)

        if observer is None:
            out = _cat([experts(self.moe_fn, s) for s in chunks])
        else:
            pairs = [experts(grouped_moe, s, return_norms=True) for s in chunks]
            out, norms = _cat([p[0] for p in pairs]), _cat([p[1] for p in pairs])
            observer(MoEObservation(self.layer, xt, logits, r, out, norms))
        self.last_routing = r
        return out.view(B, S, D)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def run_blocks(cfg, block_at: Callable[[int], nn.Module], h: torch.Tensor, start: int, stop: int,
               masks: dict | None, observer: Observer | None, cache: KVCache | None, device, **pool_kw) -> torch.Tensor:
    """Layers [start, stop) on h [B, S, D], each block fetched by `block_at` (resident, or loaded
    for the moment by the streamed model); the KV cache advances once the last layer has run."""
    pos = cache.length if cache is not None else 0
    cos, sin = rope_for(cfg, h.shape[1], pos, device)
    for i in range(start, stop):
        h = block_at(i)(h, cos, sin, cache, pos, observer=observer, allowed=masks.get(i) if masks else None, **pool_kw)
    if cache is not None and stop == cfg.num_hidden_layers:
        cache.length = pos + h.shape[1]
    return h
