"""Prefill throughput of emo's runtime vs a naive implementation in the style of EMO's released
modeling code (eager attention with a materialised fp32 softmax, and an MoE that builds a one-hot
expert mask and loops over ALL experts with torch.where), on the same random EMO-shaped weights,
in one run, at a long prefill and at a short one (where the loop over empty experts dominates).

    python bench/forward.py                      # d=1024, 8 layers, 64+1 experts x 512, top-8, 2048 tokens
    python bench/forward.py --layers 2 --tokens 512   # quicker
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from emo_cli.arch import layers
from emo_cli.arch.emo import EmoConfig, EmoForCausalLM


def naive_moe(x, experts, weights, w_gate, w_up, w_down, return_norms=False):
    """HF-style: loop over every expert, find its tokens with torch.where on a one-hot mask."""
    E = w_gate.shape[0]
    out = torch.zeros_like(x)
    mask = F.one_hot(experts, num_classes=E).permute(2, 1, 0)  # [E, K, T]
    for e in range(E):
        slot, tok = torch.where(mask[e])
        xe = x[tok]
        h = F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())
        out.index_add_(0, tok, (h @ w_down[e].t()) * weights[tok, slot, None].to(x.dtype))
    return out


def eager_attention(self, x, cos, sin, cache, layer, start):
    B, S, _ = x.shape
    q = self.q_proj(x).view(B, S, self.n_heads, self.hd).transpose(1, 2)
    k = self.k_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)
    v = self.v_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    rep = self.n_heads // self.n_kv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(2, 3)) * self.hd ** -0.5  # [B, H, S, S]
    causal = torch.full((S, S), float("-inf")).triu(1)
    probs = torch.softmax((scores + causal).float(), dim=-1).to(q.dtype)
    return self.o_proj((probs @ v).transpose(1, 2).reshape(B, S, -1))


def build(args) -> EmoForCausalLM:
    cfg = EmoConfig(vocab_size=args.vocab, hidden_size=args.d, num_hidden_layers=args.layers,
                    num_attention_heads=args.d // 128, intermediate_size=args.width,
                    num_experts=args.experts + 1, num_experts_per_tok=args.top_k, num_shared_experts=1)
    torch.manual_seed(0)
    model = EmoForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
    return model.requires_grad_(False).eval()


def time_prefill(model, ids, reps) -> float:
    with torch.no_grad():
        model.hidden_states(ids[:, :64])  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            model.hidden_states(ids)
            best = min(best, time.perf_counter() - t)
    return ids.numel() / best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64, help="routed experts (+1 shared)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=8, help="slots per token including the shared expert")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args)
    print(f"model: d={args.d} layers={args.layers} experts={args.experts}+1 x {args.width} top-{args.top_k}, "
          f"{args.threads} threads, fp32")
    for n in (args.tokens, 16):
        ids = torch.randint(0, args.vocab, (1, n))
        fast = time_prefill(model, ids, args.reps)
        grouped, sdpa = layers.grouped_moe, layers.Attention.forward
        layers.grouped_moe, layers.Attention.forward = naive_moe, eager_attention
        try:
            slow = time_prefill(model, ids, args.reps)
        finally:
            layers.grouped_moe, layers.Attention.forward = grouped, sdpa
        print(f"{n:5d} tokens: emo {fast:9.1f} tok/s | naive HF-style {slow:9.1f} tok/s | ratio {fast / slow:.2f}x")


if __name__ == "__main__":
    main()
