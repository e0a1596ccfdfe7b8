"""The EMO architecture (allenai/EMO `modeling_emo.py` semantics), written for emo.

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

from emo_cli.arch.config import EmoConfig
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


def rope_for(cfg: EmoConfig, S: int, start: int, device) -> tuple[torch.Tensor, torch.Tensor]:
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
    def __init__(self, cfg: EmoConfig):
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
    def __init__(self, cfg: EmoConfig, layer: int, num_experts: int, num_shared: int,
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


class Block(nn.Module):
    def __init__(self, cfg: EmoConfig, i: int):
        super().__init__()
        self.index = i
        self.pre_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        n = cfg.layer_experts(i)
        if n == 0:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size, cfg.dense_mlp_bias)
        else:
            self.mlp = MoEBlock(cfg, i, n, cfg.layer_shared(i), cfg.layer_always_active(i))

    def attend(self, h, cos, sin, cache=None, start=0):
        """First half of the block: the residual stream after attention."""
        return h + self.self_attn(self.pre_attention_layernorm(h), cos, sin, cache, self.index, start)

    def forward(self, h, cos, sin, cache, start, observer=None, allowed=None, **pool_kw):
        h = self.attend(h, cos, sin, cache, start)
        if isinstance(self.mlp, DenseMLP):
            return h + self.mlp(self.pre_feedforward_layernorm(h))
        return h + self.mlp(self.pre_feedforward_layernorm(h), observer=observer, allowed=allowed, **pool_kw)

    def router_probs(self, h, cos, sin) -> torch.Tensor:
        """Unmasked routing probabilities [T, E] of this layer's MoE block for its input h [B, S, D]
        (the attention half and the router only: EMO's layerwise router method needs no experts)."""
        x = self.pre_feedforward_layernorm(self.attend(h, cos, sin))
        return route(x.reshape(-1, x.shape[-1]) @ self.mlp.router.t(), self.mlp.spec).probs


def run_blocks(cfg: EmoConfig, block_at: Callable[[int], Block], h: torch.Tensor, start: int, stop: int,
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


class EmoForCausalLM(nn.Module):
    """State-dict names mirror the released HF names, with experts stacked per layer."""

    def __init__(self, cfg: EmoConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_budget = DEFAULT_ACTIVATION_BUDGET  # model/memory.py sets it for the work at hand

    # ---- helpers ------------------------------------------------------------------------------
    def moe_blocks(self) -> dict[int, MoEBlock]:
        return {i: b.mlp for i, b in enumerate(self.layers) if isinstance(b.mlp, MoEBlock)}

    def set_expert_mask(self, kept: dict[int, list[int]] | None) -> None:
        """Restrict routing to the given ORIGINAL expert ids per layer (None clears every mask)."""
        for i, blk in self.moe_blocks().items():
            if kept is None or i not in kept:
                blk.allowed = None
                continue
            keep = set(int(e) for e in kept[i])
            blk.allowed = torch.tensor([int(e) in keep for e in blk.expert_ids.tolist()],
                                       device=blk.router.device)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ---- the model interface (emo_cli/model/api.py) --------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def expert_ids(self) -> list[list[int] | None]:
        return [b.mlp.expert_ids.tolist() if isinstance(b.mlp, MoEBlock) else None for b in self.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids.to(self.device))  # [B, S, D]

    def run_layers(self, h: torch.Tensor, start: int, stop: int, masks: dict | None = None,
                   observer: Observer | None = None, cache: KVCache | None = None, **pool_kw) -> torch.Tensor:
        """Layers [start, stop) on the residual stream h [B, S, D]; masks: layer -> [E] or [T, E] bool."""
        return run_blocks(self.config, self.layers.__getitem__, h, start, stop, masks, observer, cache,
                          self.device, **pool_kw)

    def router_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.layers[layer].router_probs(h, *self.rope(h.shape[1]))  # [T, E]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()  # [..., V]

    def release(self) -> None:
        """Everything stays resident: nothing to drop."""

    # ---- whole-model conveniences -------------------------------------------------------------
    def rope(self, S: int, start: int = 0):
        return rope_for(self.config, S, start, self.device)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      observer: Observer | None = None, **pool_kw) -> torch.Tensor:
        """The residual stream [B, S, D] after the last layer."""
        return self.run_layers(self.embed(input_ids), 0, len(self.layers), observer=observer, cache=cache, **pool_kw)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                observer: Observer | None = None, **pool_kw) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, cache, observer, **pool_kw))

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))
