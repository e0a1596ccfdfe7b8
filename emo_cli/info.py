"""Facts about a model without loading its weights: shapes come from tensor headers."""

from __future__ import annotations

from pathlib import Path

from .loading import is_gguf, open_hf_dir, read_pruning_metadata, resolve_model_path


def expert_params(cfg) -> int:
    return 3 * cfg.hidden_size * cfg.intermediate_size


def count_params(cfg, total: int) -> dict:
    """Total and per-token active parameters from the config (+ the headers' total)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    embed = 2 * V * D  # untied embedding + lm_head
    inactive = 0
    for i in range(cfg.num_hidden_layers):
        n = cfg.layer_experts(i)
        if n:
            k = min(cfg.num_experts_per_tok, n)
            inactive += (n - k) * expert_params(cfg)
    active = total - inactive
    return {"params_total": total, "params_active": active, "params_active_no_embed": active - embed}


def hf_info(path: Path) -> dict:
    files = open_hf_dir(path)
    cfg, ckpt = files.config, files.ckpt
    total = 0
    for name in ckpt.names():
        n = 1
        for s in ckpt.shape(name):
            n *= s
        total += n
    layers = []
    for i in range(cfg.num_hidden_layers):
        n, ns = cfg.layer_experts(i), cfg.layer_shared(i)
        layers.append({"layer": i, "experts": n, "routed": n - ns if n else 0, "shared": ns,
                       "always_active": list(cfg.layer_always_active(i)), "dense": n == 0})
    dtypes = sorted({str(ckpt.dtype(n)).replace("torch.", "") for n in ckpt.names()})
    info = {
        "model": str(path), "format": "hf", "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.kv_heads,
        "vocab_size": cfg.vocab_size, "top_k": cfg.num_experts_per_tok,
        "experts_per_layer": layers, "dtype": ",".join(dtypes), "bytes": ckpt.bytes_on_disk(),
        "fingerprint": files.fingerprint, **count_params(cfg, total),
    }
    meta = read_pruning_metadata(path)
    if meta:
        info["pruning"] = meta
    from .memory import command_estimates

    info["memory"] = command_estimates(files)
    return info


def model_info(spec) -> dict:
    path = resolve_model_path(spec)
    if is_gguf(path):
        from .gguf_format import gguf_info

        return gguf_info(path)
    return hf_info(path)
