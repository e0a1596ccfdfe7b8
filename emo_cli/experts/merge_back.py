"""Slim model -> its experts back in the full model ("reintegration", docs/design.md#selection-methods).

Each expert the slim model kept goes back to its ORIGINAL id in the full model (pruning_metadata's
experts_kept_per_layer gives the ids, in the slim model's local order). By default only the routed
experts' MLPs travel; `include` adds the router rows of the kept experts ("router"), the shared
expert's MLP ("shared") and every non-MoE tensor: attention, norms, embeddings, head, dense MLPs
("non-expert"). `average` a writes (1 - a) * full + a * slim (in float64, rounded once to the
checkpoint's dtype) instead of the slim weights. Streamed tensor by tensor: memory is one tensor
plus the pending output shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from emo_cli import __version__
from emo_cli.errors import EmoError
from emo_cli.experts.slim_hf import MAX_SHARD_BYTES
from emo_cli.model.checkpoint import ShardWriter
from emo_cli.model.loading import copy_support_files, open_hf_dir, read_pruning_metadata, source_expert_ids
from emo_cli.outputs import check_location, staged_dir

PARTS = ("router", "shared", "non-expert")


def parse_include(text: str) -> set[str]:
    parts = {p.strip() for p in text.split(",") if p.strip()}
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise EmoError(f"--include {unknown[0]!r} is not one of {', '.join(PARTS)}")
    return parts


def merged_tensor(full: torch.Tensor, slim: torch.Tensor, average: float | None) -> torch.Tensor:
    if full.shape != slim.shape:
        raise EmoError(f"shapes differ: full {tuple(full.shape)}, slim {tuple(slim.shape)}")
    if average is None:
        return slim.to(full.dtype)
    return ((1 - average) * full.double() + average * slim.double()).to(full.dtype)


def merge_back(slim_dir: Path, full_dir: Path, out_dir: Path, include: set[str] = frozenset(),
               average: float | None = None, force: bool = False, on_tensor=None) -> dict:
    """Write the full model with the slim model's experts put back into `out_dir`; returns the
    merge metadata (also written as merge_metadata.json). `on_tensor(done, total, bytes)` after
    each tensor."""
    slim_dir, full_dir, out_dir = Path(slim_dir), Path(full_dir), Path(out_dir)
    if average is not None and not 0.0 <= average <= 1.0:
        raise EmoError(f"--average must be in [0, 1], got {average}")
    meta = read_pruning_metadata(slim_dir)
    if not meta or not isinstance(meta.get("experts_kept_per_layer"), list):
        raise EmoError(f"{slim_dir}: no pruning_metadata.json with experts_kept_per_layer (not a pruned model)")
    full, slim = open_hf_dir(full_dir), open_hf_dir(slim_dir)
    if meta.get("source_fingerprint") and meta["source_fingerprint"] != full.fingerprint:
        raise EmoError(f"{slim_dir} was pruned from another model (fingerprint {meta['source_fingerprint']}, "
                       f"{full_dir} is {full.fingerprint})")
    cfg = full.config
    kept = source_expert_ids(slim_dir, slim.config)  # per layer: original id of each local expert
    if len(kept) != cfg.num_hidden_layers:
        raise EmoError(f"{slim_dir} has {len(kept)} layers, {full_dir} has {cfg.num_hidden_layers}")
    if out_dir.exists() and not force:
        raise EmoError(f"{out_dir} exists (pass --force to overwrite)")
    check_location(out_dir)
    local = [{e: k for k, e in enumerate(ids)} if ids else {} for ids in kept]  # original id -> slim index
    shared = [set(range(cfg.layer_experts(i) - cfg.layer_shared(i), cfg.layer_experts(i)))
              for i in range(cfg.num_hidden_layers)]
    moved = [[] for _ in kept]
    with staged_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, shard_bytes=MAX_SHARD_BYTES)
        tn = full.names
        first_proj = next(iter(tn.expert_projs.values()))

        def order(name):  # checkpoint order: non-layer tensors first, then layer by layer (numerically)
            layer = tn.parse(name).layer
            return (-1, name) if layer is None else (layer, name)

        names = sorted(full.ckpt.names(), key=order)
        for n_done, name in enumerate(names, 1):
            t = full.ckpt.get(name)
            ref = tn.parse(name)
            layer = ref.layer
            if ref.expert is not None:
                i, j = layer, ref.expert
                wanted = j in local[i] and (j not in shared[i] or "shared" in include)
                if wanted:
                    t = merged_tensor(t, slim.ckpt.get(tn.expert_of(i, local[i][j], ref.proj)), average)
                    if ref.proj == first_proj:
                        moved[i].append(j)
            elif ref.router:
                if "router" in include and local[layer]:
                    rows = slim.ckpt.get(name)  # [kept, D]
                    t = t.clone()
                    for e, k in local[layer].items():
                        if e not in shared[layer] or "shared" in include:
                            t[e] = merged_tensor(t[e], rows[k], average)
            elif "non-expert" in include:
                if name not in slim.ckpt.headers:
                    raise EmoError(f"{slim_dir} has no tensor {name}")
                t = merged_tensor(t, slim.ckpt.get(name), average)
            writer.add(name, t)
            if on_tensor:
                on_tensor(n_done, len(names), writer.total)
        writer.close()
        shutil.copyfile(full_dir / "config.json", tmp / "config.json")
        copy_support_files(full_dir, tmp, json.loads(full.config_text))
        record = {"parent_model": str(full_dir), "slim_model": str(slim_dir), "include": sorted(include),
                  "average": average, "experts_merged_per_layer": [sorted(v) if kept[i] else None
                                                                    for i, v in enumerate(moved)],
                  "slim_pruning": {k: meta.get(k) for k in ("original_model", "pruning_method", "budget")},
                  "parent_fingerprint": full.fingerprint, "emo_version": __version__}
        (tmp / "merge_metadata.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
