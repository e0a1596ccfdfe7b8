"""Plan -> slim HF directory, streamed tensor by tensor from the source checkpoint.

Kept experts are renumbered 0..keep-1 in ascending ORIGINAL id order, so a legacy shared expert
(the largest id) stays last, as EMO's own pruning scripts do; router rows are sliced the same way.
Re-softmaxing over the kept logits equals masking the dropped ones to -inf, so the slim model's
logits equal the full model's with routing masked to the plan (docs/design.md#the-masking-identity).
Peak memory: one layer plus the pending output shard; never the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

from emo_cli import __version__
from emo_cli.errors import EmoError
from emo_cli.experts.selection import Plan
from emo_cli.model.checkpoint import ShardWriter
from emo_cli.model.loading import HFModelFiles, copy_support_files, open_hf_dir, source_expert_ids
from emo_cli.outputs import staged_dir

MAX_SHARD_BYTES = 5 * 10**9  # transformers' max_shard_size="5GB", as the released checkpoints are sharded


def slim_config(cfg, plan: Plan, local_kept: dict[int, list[int]]) -> dict:
    d = cfg.to_dict()
    layers = range(cfg.num_hidden_layers)
    counts = [len(local_kept[i]) if i in local_kept else cfg.layer_experts(i) for i in layers]
    moe_counts = [c for i, c in zip(layers, counts) if cfg.layer_experts(i) > 0]
    shared = [cfg.layer_shared(i) for i in layers]
    uniform = len(set(moe_counts)) == 1
    top_k = cfg.num_experts_per_tok
    d["num_experts_per_tok"] = min(top_k, min(moe_counts))
    d["num_experts"] = moe_counts[0]
    ns = [s for i, s in zip(layers, shared) if cfg.layer_experts(i) > 0]
    d["num_shared_experts"] = ns[0] if ns else 0
    if not uniform or cfg.num_experts_per_layer is not None:
        d["num_experts_per_layer"] = counts
        if cfg.num_shared_experts_per_layer is not None or len(set(ns)) > 1 or not uniform:
            d["num_shared_experts_per_layer"] = shared
    aa_any = any(cfg.layer_always_active(i) for i in layers)
    if aa_any:  # always-active indices follow their experts to the new local positions
        new_aa = []
        for i in layers:
            aa = cfg.layer_always_active(i)
            new_aa.append([local_kept[i].index(a) for a in aa] if aa and i in local_kept else (list(aa) or None))
        d["always_active_experts_per_layer"] = new_aa
        d["always_active_experts"] = None
    return d


def prune_to_dir(model: HFModelFiles | Path, plan: Plan, out_dir: Path, force: bool = False,
                 extra_meta: dict | None = None, on_layer=None, source_name: str | None = None) -> Path:
    """Write the slim model described by `plan` into `out_dir` (temporary name, renamed when done);
    `model` is the source, opened (a command's handle) or a directory; `on_layer(layer,
    bytes_written)` is called after each layer."""
    files = model if isinstance(model, HFModelFiles) else open_hf_dir(model)
    model_dir, out_dir = files.dir, Path(out_dir)
    cfg, ckpt = files.config, files.ckpt
    if plan.model_fingerprint != files.fingerprint:
        raise EmoError(f"the plan was made for model {plan.model_fingerprint}, not {model_dir} ({files.fingerprint})")
    if out_dir.exists() and not force:
        raise EmoError(f"{out_dir} exists (pass --force to overwrite)")
    orig_ids = source_expert_ids(model_dir, cfg)
    local_kept: dict[int, list[int]] = {}
    for i in range(cfg.num_hidden_layers):
        if orig_ids[i] is None:
            continue
        wanted = plan.kept.get(i)
        if wanted is None:
            local_kept[i] = list(range(len(orig_ids[i])))
            continue
        missing = sorted(set(wanted) - set(orig_ids[i]))
        if missing:
            raise EmoError(f"plan keeps expert {missing[0]} in layer {i}, which {model_dir} does not have")
        pos = {e: j for j, e in enumerate(orig_ids[i])}
        local_kept[i] = sorted(pos[e] for e in wanted)
        ns = cfg.layer_shared(i)
        if ns and not cfg.layer_always_active(i):
            n = cfg.layer_experts(i)
            if not set(range(n - ns, n)) <= set(local_kept[i]):
                raise EmoError(f"plan drops the shared expert of layer {i}; shared experts are always kept")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out_dir) as tmp:
        names = files.names
        dtype = ckpt.dtype(names.embed)
        writer = ShardWriter(tmp, shard_bytes=MAX_SHARD_BYTES)
        by_layer: dict[int, list[str]] = {}
        other = []
        for n in ckpt.names():
            layer = names.parse(n).layer
            if layer is not None:
                by_layer.setdefault(layer, []).append(n)
            else:
                other.append(n)
        for n in sorted(other):
            writer.add(n, ckpt.get(n))
        for i in sorted(by_layer):
            keep = local_kept.get(i)
            for n in sorted(by_layer[i]):
                ref = names.parse(n)
                if keep is not None and ref.router:
                    writer.add(n, ckpt.get(n)[keep])  # [keep, D] router rows
                elif keep is not None and ref.expert is not None:
                    if ref.expert in keep:
                        writer.add(names.renumbered(n, keep.index(ref.expert)), ckpt.get(n))
                else:
                    writer.add(n, ckpt.get(n))
            if on_layer:
                on_layer(i, writer.total)
        writer.close()
        config = slim_config(cfg, plan, local_kept)
        config["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_support_files(model_dir, tmp, config)
        kept_orig = [None if orig_ids[i] is None else [orig_ids[i][j] for j in local_kept[i]]
                     for i in range(cfg.num_hidden_layers)]
        counts = [len(k) for k in kept_orig if k is not None]
        uniform = len(set(counts)) == 1
        meta = {
            "original_model": source_name or str(model_dir),
            "num_shared_experts": config["num_shared_experts"],
            "experts_kept_per_layer": kept_orig,
            "pruning_method": plan.method,
            "emo_version": __version__,
            "budget": plan.budget,
            "allocation": plan.allocation,
            "source_fingerprint": files.fingerprint,
        }
        if uniform:
            meta["prune_keep_k"] = counts[0]
        else:
            meta["keep_k_per_layer"] = [None if k is None else len(k) for k in kept_orig]
        if plan.extra.get("profile_fingerprint"):
            meta["profile_fingerprint"] = plan.extra["profile_fingerprint"]
        if "seed" in plan.extra:  # a seeded method's plan
            meta["seed"] = plan.extra["seed"]
        meta.update(extra_meta or {})
        (tmp / "pruning_metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def expected_size(model: HFModelFiles | Path, plan: Plan) -> tuple[int, int]:
    """(bytes of the source checkpoint, bytes the slim one will have), from tensor headers."""
    files = model if isinstance(model, HFModelFiles) else open_hf_dir(model)
    ckpt = files.ckpt
    full = slim = 0
    for n in ckpt.names():
        info = ckpt.headers[n]
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        full += nbytes
        ref = files.names.parse(n)
        if ref.router or ref.expert is not None:
            kept = plan.kept.get(ref.layer)
            n_exp = files.config.layer_experts(ref.layer)
            # a router loses rows; experts are counted as the layer's average expert
            slim += nbytes if kept is None or not n_exp else nbytes * len(kept) // n_exp
        else:
            slim += nbytes
    return full, slim
