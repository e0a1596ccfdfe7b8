"""An independent float64 EMO forward for tests, written from the EMO paper's architecture without emo's runtime.

It reads the released per-expert HF tensor names directly and loops over tokens and experts the
slow, obvious way. `keep` optionally restricts routing to ORIGINAL expert ids per layer by masking
router logits to -inf (docs/design.md#the-masking-identity).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def load_tensors(model_dir: Path) -> tuple[dict, dict]:
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            tensors[k] = v.astype(np.float64)
    return cfg, tensors


def _rms(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def _softmax(z):
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _layer_setup(cfg, i):
    per = cfg.get("num_experts_per_layer")
    n = per[i] if per is not None else cfg["num_experts"]
    if cfg.get("num_shared_experts_per_layer") is not None:
        ns = cfg["num_shared_experts_per_layer"][i]
    else:
        ns = min(cfg.get("num_shared_experts") or 0, n)
    aa = None
    if cfg.get("always_active_experts_per_layer") is not None:
        aa = cfg["always_active_experts_per_layer"][i]
    elif cfg.get("always_active_experts") is not None:
        aa = cfg["always_active_experts"]
    return n, ns, aa or []


def _topk(v, k):
    # descending, ties to the lower index (torch.topk's order on CPU for distinct values)
    order = sorted(range(len(v)), key=lambda j: (-v[j], j))
    return order[:k]


def _route_token(logit, n, ns, aa, top_k, norm):
    """-> list of (local expert index, weight)."""
    if aa:
        p = _softmax(logit)
        cand = [j for j in range(n) if j not in aa]
        sel = [cand[j] for j in _topk([p[c] for c in cand], top_k - len(aa))]
        return [(a, p[a]) for a in aa] + [(j, p[j]) for j in sel]
    if ns > 0:
        pr = _softmax(logit[: n - ns])
        ps = _softmax(logit[n - ns:])
        out = [(j, pr[j]) for j in _topk(list(pr), top_k - ns)]
        return out + [(n - ns + j, ps[j]) for j in _topk(list(ps), ns)]
    p = _softmax(logit)
    sel = [(j, p[j]) for j in _topk(list(p), top_k)]
    if norm:
        s = sum(w for _, w in sel)
        sel = [(j, w / s) for j, w in sel]
    return sel


def forward(cfg, T, ids, keep=None, expert_ids=None):
    """Logits [S, V] float64 for one sequence of token ids.

    keep: {layer: original ids allowed}; expert_ids: {layer: original id of each local expert}.
    """
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads") or H
    hd = D // H
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    S = len(ids)
    x = T["model.embed_tokens.weight"][ids]  # [S, D]
    inv = np.array([theta ** (-(2 * i) / hd) for i in range(hd // 2)])
    ang = np.outer(np.arange(S), inv)
    cos = np.concatenate([np.cos(ang)] * 2, axis=1)
    sin = np.concatenate([np.sin(ang)] * 2, axis=1)

    def rope(v):  # [S, hd]
        half = hd // 2
        rot = np.concatenate([-v[:, half:], v[:, :half]], axis=1)
        return v * cos + rot * sin

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = _rms(x, T[f"{p}.pre_attention_layernorm.weight"], eps)
        q = h @ T[f"{p}.self_attn.q_proj.weight"].T
        k = h @ T[f"{p}.self_attn.k_proj.weight"].T
        v = h @ T[f"{p}.self_attn.v_proj.weight"].T
        att = np.zeros((S, H * hd))
        for head in range(H):
            kvh = head // (H // Hkv)
            qh = rope(q[:, head * hd:(head + 1) * hd])
            kh = rope(k[:, kvh * hd:(kvh + 1) * hd])
            vh = v[:, kvh * hd:(kvh + 1) * hd]
            sc = qh @ kh.T / math.sqrt(hd)
            sc = np.where(np.tril(np.ones((S, S))) > 0, sc, -np.inf)
            att[:, head * hd:(head + 1) * hd] = _softmax(sc) @ vh
        x = x + att @ T[f"{p}.self_attn.o_proj.weight"].T
        h = _rms(x, T[f"{p}.pre_feedforward_layernorm.weight"], eps)
        n, ns, aa = _layer_setup(cfg, i)
        if n == 0:
            def lin(name, z):
                y = z @ T[f"{p}.mlp.{name}.weight"].T
                b = T.get(f"{p}.mlp.{name}.bias")
                return y + b if b is not None else y
            x = x + lin("down_proj", _silu(lin("gate_proj", h)) * lin("up_proj", h))
            continue
        logits = h @ T[f"{p}.mlp.gate.weight"].T  # [S, n]
        if keep is not None and i in keep:
            ids_here = expert_ids[i] if expert_ids else list(range(n))
            allowed = np.array([e in set(keep[i]) for e in ids_here])
            logits = np.where(allowed, logits, -np.inf)
        top_k = min(cfg["num_experts_per_tok"], n)
        out = np.zeros_like(x)
        for t in range(S):
            for j, w in _route_token(logits[t], n, ns, aa, top_k, cfg.get("norm_topk_prob", False)):
                e = f"{p}.mlp.experts.{j}"
                g = T[f"{e}.gate_proj.weight"] @ h[t]
                u = T[f"{e}.up_proj.weight"] @ h[t]
                out[t] += w * (T[f"{e}.down_proj.weight"] @ (_silu(g) * u))
        x = x + out
    x = _rms(x, T["model.norm.weight"], eps)
    return x @ T["lm_head.weight"].T


def doc_nll(cfg, T, ids, **kw) -> float:
    logits = forward(cfg, T, ids, **kw)
    total = 0.0
    for t in range(len(ids) - 1):
        z = logits[t] - logits[t].max()
        total += -(z[ids[t + 1]] - math.log(np.exp(z).sum()))
    return total
