"""Facts about a model without loading its weights: shapes come from tensor headers."""

from __future__ import annotations

from pathlib import Path

from gguf import Keys

from emo_cli.gguf import layout as gf
from emo_cli.gguf.quants import quant_name
from emo_cli.model.loading import is_gguf, open_hf_dir, read_pruning_metadata, resolve_model_path


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
    from emo_cli.model.memory import command_estimates

    info["memory"] = command_estimates(files)
    return info


def gguf_info(path: Path) -> dict:
    """The facts `emo info` reports for an HF directory (`info.hf_info`), read from a GGUF file.

    Parameter counts are in HF terms (the shared expert's router row, which the file drops, is
    counted; a zero-filled shexp is not), so an export reports the same numbers as its source.
    """
    path = Path(path)
    reader = gf.open_reader(path)
    cfg = gf.config_from_gguf(reader, path)
    total = sum(int(t.n_elements) for t in reader.tensors)
    D, F = cfg.hidden_size, cfg.intermediate_size
    for i in cfg.moe_layers():
        if cfg.layer_shared(i):
            total += D  # the shared expert's router row
        else:
            total -= 3 * D * F  # the zero filler shexp
    layers = []
    for i in range(cfg.num_hidden_layers):
        n, ns = cfg.layer_experts(i), cfg.layer_shared(i)
        layers.append({"layer": i, "experts": n, "routed": n - ns if n else 0, "shared": ns,
                       "always_active": [], "dense": n == 0})
    info = {
        "model": str(path), "format": "gguf", "quant": quant_name(gf.field(reader, Keys.General.FILE_TYPE)),
        "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads, "kv_heads": cfg.kv_heads, "vocab_size": cfg.vocab_size,
        "top_k": cfg.num_experts_per_tok, "experts_per_layer": layers,
        "dtype": ",".join(sorted({t.tensor_type.name for t in reader.tensors})),
        "bytes": path.stat().st_size, "fingerprint": gf.gguf_fingerprint(reader), **count_params(cfg, total),
    }
    general = {k.removeprefix("general."): gf.field(reader, k) for k in sorted(reader.fields)
               if k.startswith("general.") and k not in (Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE,
                                                         Keys.General.QUANTIZATION_VERSION, Keys.General.ALIGNMENT)}
    if general:
        info["general"] = general
    prov = gf.provenance(reader)
    if prov:
        info["pruning"] = {gf.PROVENANCE_METADATA_NAMES[k]: v for k, v in prov.items()}
    return info


def model_info(spec) -> dict:
    path = resolve_model_path(spec)
    return gguf_info(path) if is_gguf(path) else hf_info(path)
