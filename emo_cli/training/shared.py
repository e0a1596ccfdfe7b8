"""What emo's training loops (pretrain, finetune) share: the device choice, resumable checkpoints
(weights + AdamW moments + a JSON state) and EMO's routed load-balancing loss."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from emo_cli.arch.routing import routed_mask
from emo_cli.errors import EmoError


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmoError("--device cuda requested but no CUDA GPU is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise EmoError(f"unknown device {device!r} (use auto, cpu or cuda)")
    return device


def balance_loss(block, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(R/k)·dot(counts/T, mean routed probability) of `block`'s last routing, over routed experts
    only (the shared expert is always chosen, so it carries no balance signal) and over the tokens
    where `valid` ([T] bool) holds: padding must not pull the balance."""
    r = block.last_routing
    routed = routed_mask(block.spec, r.probs.device)  # [E]
    R, k = int(routed.sum()), block.spec.top_k - block.spec.num_shared
    experts, probs = r.experts[:, :k], r.probs[:, routed]  # [T, k] routed slots come first, [T, R]
    if valid is not None:
        experts, probs = experts[valid], probs[valid]
    T = probs.shape[0]
    if T == 0:
        return probs.sum() * 0.0
    counts = torch.bincount(experts.reshape(-1), minlength=R)[:R].float()  # [R]
    return R / k * torch.dot(counts / T, probs.mean(0))


def save_checkpoint(ckpt: Path, model, opt: torch.optim.Optimizer, state: dict) -> None:
    """Weights, the optimizer's moments (trained parameters only) and `state`, replacing `ckpt`
    only once the new one is complete."""
    tmp = ckpt.with_name(ckpt.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    moments = {}
    for name, p in model.named_parameters():
        st = opt.state.get(p)
        if st:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                moments[f"{name}::{key}"] = torch.as_tensor(st[key]).detach().cpu().contiguous()
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    old = ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, model, opt: torch.optim.Optimizer, expect: dict) -> dict:
    """Restore what save_checkpoint wrote; `expect` holds state entries that must match (format,
    the fingerprint of the run's settings), else the checkpoint belongs to another run."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        weights = load_file(str(ckpt / "model.safetensors"))
        moments = load_file(str(ckpt / "optimizer.safetensors"))
    except Exception as e:  # OSError, JSON or safetensors' own error types: all mean the same here
        raise EmoError(f"{ckpt}: unreadable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(state, dict) or any(state.get(k) != v for k, v in expect.items()):
        raise EmoError(f"{ckpt}: checkpoint was written with different settings; use --force to start over")
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=True)
    except RuntimeError:
        raise EmoError(f"{ckpt}: checkpoint does not match the model; use --force to start over") from None
    for name, p in model.named_parameters():
        if f"{name}::exp_avg" in moments:
            opt.state[p] = {"step": moments[f"{name}::step"].float(),
                            "exp_avg": moments[f"{name}::exp_avg"].to(device),
                            "exp_avg_sq": moments[f"{name}::exp_avg_sq"].to(device)}
    return state
