"""Finetuning a (slim) model on its domain: the recovery step of EMO's recipe.

Shape legend: B examples in a micro-batch, S padded length, T = B*S tokens, V vocab.

Defaults are EMO's: 1 epoch, global batch 32, lr 5e-5, linear schedule with 10% warmup, no weight
decay, clip 1.0, every parameter trained, loss on output tokens only. The output tokens are the
assistant turns of chat rows (`messages`), the gold answer of multiple-choice rows, and every
token of plain text. Routing is the model's own (no document pool; the shared expert joins with
weight 1, no renormalisation). With `output_router_logits` in the config (pruning sets it, as EMO's
does), router_aux_loss_coef × the routed load-balancing loss over non-pad tokens is added.

Each example is cut into windows of at most seq_len tokens. Consecutive windows share one token,
so every token after the first has a prediction. Windows without a target are dropped. Examples
are shuffled per epoch by a generator seeded with (seed, epoch), so step s always sees the same
examples and a resumed run is bit-identical to an uninterrupted one.

Memory: full finetuning keeps fp32 weights, gradients and two AdamW moments for every trained
parameter (16 bytes each). `memory_estimate` counts them on the meta device, so the check before
loading and the --help text use the same arithmetic as the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from emo_cli import __version__
from emo_cli.arch.emo import EmoConfig, EmoForCausalLM
from emo_cli.data.documents import Document, data_hash, heldout_split, read_documents
from emo_cli.errors import EmoError
from emo_cli.model.loading import (
    copy_support_files,
    load_resident,
    open_hf_dir,
    save_hf_model,
)
from emo_cli.model.memory import available_memory
from emo_cli.model.tokenizer import EmoTokenizer
from emo_cli.outputs import check_location, staged_dir
from emo_cli.training.shared import balance_loss, load_checkpoint, resolve_device, save_checkpoint
from emo_cli.ui import human_bytes

FREEZE_MODES = ("none", "router", "attention", "non-expert", "experts")
FREEZE_HELP = {"none": "train everything (EMO's default)", "router": "freeze the routers",
               "attention": "freeze attention", "non-expert": "train the experts only",
               "experts": "freeze the experts (train attention, routers, norms, embeddings, head)"}


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: float = 1.0
    batch_size: int = 32  # examples per optimizer step
    micro_batch: int = 4  # examples per forward; gradients accumulate up to batch_size
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seq_len: int = 2048
    freeze: str = "none"
    heldout_frac: float = 0.1
    precision: str = "auto"  # fp32 | bf16 (autocast; frozen weights stored in bf16); auto: bf16 on a GPU
    shots: int = 0
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps

    def validate(self) -> None:
        if self.freeze not in FREEZE_MODES:
            raise EmoError(f"--freeze {self.freeze!r} is not one of {', '.join(FREEZE_MODES)}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise EmoError(f"--epochs must be a positive number, got {self.epochs}")
        if self.batch_size < 1 or self.micro_batch < 1:
            raise EmoError("--batch-size and --micro-batch must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EmoError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise EmoError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise EmoError("--weight-decay and --grad-clip must not be negative")
        if self.seq_len < 2:
            raise EmoError("--seq-len must be at least 2")
        if not 0 < self.heldout_frac < 0.5:
            raise EmoError(f"--heldout-frac must be in (0, 0.5): finetuning reports a held-out loss, got {self.heldout_frac}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise EmoError(f"--precision {self.precision!r} is not one of auto, fp32, bf16")
        if self.checkpoint_every < 1:
            raise EmoError("--checkpoint-every must be at least 1")

    def fingerprint(self, model_fingerprint: str, data_hash: str) -> str:
        key = json.dumps([asdict(self), model_fingerprint, data_hash], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---- what trains -------------------------------------------------------------------------------
def parameter_role(name: str) -> str:
    """expert, router, attention or other (embeddings, norms, head, dense MLPs) for a parameter
    name of EmoForCausalLM."""
    if ".mlp.w_gate" in name or ".mlp.w_up" in name or ".mlp.w_down" in name:
        return "expert"
    if name.endswith(".mlp.router"):
        return "router"
    if ".self_attn." in name:
        return "attention"
    return "other"


def trains(name: str, freeze: str) -> bool:
    role = parameter_role(name)
    return {"none": True, "router": role != "router", "attention": role != "attention",
            "non-expert": role == "expert", "experts": role != "expert"}[freeze]


def memory_estimate(cfg: EmoConfig, freeze: str, precision: str, micro_batch: int, seq_len: int,
                    frozen_bytes: int | None = None) -> dict:
    """Bytes a finetune needs, from the parameter counts of `cfg` (meta tensors, nothing allocated).
    Trained parameters: fp32 weight + gradient + two AdamW moments. Frozen ones: `frozen_bytes`,
    by default 4 in fp32 and 2 in bf16 (a bf16 checkpoint's frozen weights stay bf16). Activations are an approximate count of what autograd keeps per token and layer
    (attention inputs and outputs, the K expert copies of each token and their hidden units;
    scaled_dot_product_attention keeps no score matrix) plus the logits and their gradient."""
    with torch.device("meta"):
        model = EmoForCausalLM(cfg)
    trained = sum(p.numel() for n, p in model.named_parameters() if trains(n, freeze))
    frozen = sum(p.numel() for n, p in model.named_parameters() if not trains(n, freeze))
    act_bytes = 4 if precision == "fp32" else 2
    D, F_, K, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok, cfg.num_hidden_layers
    tokens = micro_batch * seq_len
    per_token = L * (12 * D + K * (2 * D + 3 * F_)) * act_bytes
    weights = trained * 4 + frozen * (frozen_bytes or act_bytes)
    out = {"trained_parameters": trained, "frozen_parameters": frozen, "weights": weights,
           "gradients": trained * 4, "optimizer": trained * 8,
           "activations": tokens * per_token + tokens * cfg.vocab_size * 8}
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"] + out["activations"]
    return out


def released_slim_config(keep: int = 32) -> EmoConfig:
    """The released 14B model's shapes pruned to `keep` experts per layer (shared included)."""
    return EmoConfig(vocab_size=100278, num_experts=keep, num_shared_experts=1, num_experts_per_tok=8)


def help_estimates(keep: int = 32, micro_batch: int = 1, seq_len: int = 2048) -> list[tuple[str, dict]]:
    """(freeze mode, estimate) for the released model pruned to 25%, on a GPU in bf16."""
    cfg = released_slim_config(keep)
    return [(mode, memory_estimate(cfg, mode, "bf16", micro_batch, seq_len)) for mode in FREEZE_MODES]


# ---- examples ----------------------------------------------------------------------------------
@dataclass
class Window:
    ids: list[int]  # [n] token ids, n <= seq_len
    target: list[bool]  # [n] token i is trained on (predicted from ids[:i]); target[0] is never used


def output_spans(doc: Document, chat_template: str | None, eos_text: str) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans the loss is on) of one example."""
    if doc.item is not None:
        return doc.text, [(len(doc.item.context), len(doc.text))]
    if doc.messages is None:
        return doc.text, [(0, len(doc.text))]
    turns = [{"role": str(m.get("role") or ""), "content": str(m.get("content") or "")}
             for m in doc.messages if isinstance(m, dict)]
    if chat_template:
        from emo_cli.chat import render_template

        text, spans = render_template(chat_template, turns, eos_text, add_generation_prompt=False), []
        for k, m in enumerate(turns):
            if m["role"] != "assistant":
                continue
            before = render_template(chat_template, turns[:k], eos_text, add_generation_prompt=True)
            upto = render_template(chat_template, turns[:k + 1], eos_text, add_generation_prompt=False)
            if not (text.startswith(upto) and upto.startswith(before)):
                raise EmoError("the model's chat template does not render a conversation turn by turn; "
                               "cannot tell the assistant's tokens apart")
            spans.append((len(before), len(upto)))
        return text, spans
    lines, spans, pos = [], [], 0
    for m in turns:
        head = f"{m['role']}: "
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(m["content"])))
        lines.append(head + m["content"])
        pos += len(lines[-1]) + 1
    return "\n".join(lines), spans


def encode_example(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of `text` plus EOS, and which tokens overlap an output span. EOS is a target when
    the text ends in one: the model learns where an answer stops."""
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    target = [any(a < e and s < b for s, e in spans) for a, b in enc.offsets]
    ids = list(enc.ids)
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
        target.append(any(e >= len(text) for _, e in spans))
    return ids, target


def windows(ids: list[int], target: list[bool], seq_len: int) -> list[Window]:
    out, start = [], 0
    while True:
        w = Window(ids[start:start + seq_len], target[start:start + seq_len])
        if len(w.ids) >= 2 and any(w.target[1:]):
            out.append(w)
        if start + seq_len >= len(ids):
            return out
        start += seq_len - 1


def make_examples(tokenizer, docs: list[Document], seq_len: int) -> list[list[Window]]:
    """Per document, its training windows (possibly none: a prompt with no output)."""
    eos_text = tokenizer.decode([tokenizer.eos_id]) if tokenizer.eos_id is not None else ""
    out = []
    for d in docs:
        text, spans = output_spans(d, tokenizer.chat_template, eos_text)
        out.append(windows(*encode_example(tokenizer, text, spans), seq_len))
    return out


def collate(batch: list[Window], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, S], targets [B, S-1] bool, valid [B*S] bool): right padding; targets[b, i] says
    whether ids[b, i+1] is trained on."""
    S = max(len(w.ids) for w in batch)
    ids = torch.full((len(batch), S), pad_id, dtype=torch.long)
    tgt = torch.zeros(len(batch), S, dtype=torch.bool)
    valid = torch.zeros(len(batch), S, dtype=torch.bool)
    for b, w in enumerate(batch):
        ids[b, :len(w.ids)] = torch.tensor(w.ids)
        tgt[b, :len(w.ids)] = torch.tensor(w.target)
        valid[b, :len(w.ids)] = True
    return ids.to(device), tgt[:, 1:].to(device), valid.reshape(-1).to(device)


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


def autocast(device: str, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def window_nll(model, ids: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float32) of the target tokens of a padded batch."""
    logits = model(ids)[:, :-1]  # [B, S-1, V]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return (nll * tgt.reshape(-1)).sum()


@torch.no_grad()
def heldout_loss(model, wins: list[Window], pad_id: int, micro_batch: int, device: str, precision: str) -> dict:
    """Mean NLL (nats) per target token over `wins`, summed in float64."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(wins), micro_batch):
        ids, tgt, _ = collate(wins[s:s + micro_batch], pad_id, device)
        with autocast(device, precision):
            total += float(window_nll(model, ids, tgt).double())
        count += int(tgt.sum())
    return {"loss": round(total / max(count, 1), 5), "tokens": count, "windows": len(wins)}


# ---- the schedule ------------------------------------------------------------------------------
def total_steps(num_windows: int, s: FinetuneSettings) -> int:
    return max(1, math.ceil(s.epochs * math.ceil(num_windows / s.batch_size)))


def lr_at(step: int, total: int, s: FinetuneSettings) -> float:
    """Linear warmup over ceil(warmup_ratio · total) steps, then linear decay to 0 at `total`."""
    warm = math.ceil(s.warmup_ratio * total)
    if step < warm:
        return s.lr * (step + 1) / warm
    return s.lr * max(0.0, (total - step) / max(1, total - warm))


def step_windows(step: int, num_windows: int, s: FinetuneSettings) -> list[int]:
    """Window indices of optimizer step `step`: a fresh seeded permutation per epoch."""
    per_epoch = math.ceil(num_windows / s.batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(num_windows, generator=torch.Generator().manual_seed(s.seed * 1_000_003 + epoch))
    return perm[pos * s.batch_size:(pos + 1) * s.batch_size].tolist()


def train_step(model, opt, batch: list[Window], pad_id: int, s: FinetuneSettings, lb_weight: float,
               device: str, precision: str) -> tuple[float, float]:
    """One optimizer step over `batch` in micro-batches: the loss is the mean over all target
    tokens of the step (not a mean of micro-batch means). Returns (mean NLL, balance loss)."""
    model.train()
    n_target = sum(sum(w.target[1:]) for w in batch)
    micro = [batch[i:i + s.micro_batch] for i in range(0, len(batch), s.micro_batch)]
    nll_sum, lb_sum = 0.0, 0.0
    opt.zero_grad(set_to_none=True)
    for part in micro:
        ids, tgt, valid = collate(part, pad_id, device)
        with autocast(device, precision):
            nll = window_nll(model, ids, tgt)
            loss = nll / n_target
            if lb_weight > 0:
                blocks = model.moe_blocks().values()
                lb = torch.stack([balance_loss(b, valid) for b in blocks]).mean()
                loss = loss + lb_weight * lb / len(micro)
                lb_sum += float(lb.detach()) / len(micro)
        loss.backward()
        nll_sum += float(nll.detach())
    if s.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], s.grad_clip)
    opt.step()
    return nll_sum / n_target, lb_sum


# ---- the run -----------------------------------------------------------------------------------
STATE_FORMAT = 1
RECORD = "finetune.json"


def work_dir(out: Path) -> Path:
    """Where an unfinished run keeps checkpoint-0 and its resumable state, beside the output."""
    return out.with_name(out.name + ".partial")


def check_output(out: Path, resume: bool, force: bool) -> None:
    """Before any work: refuse to replace what the user has, or an emo output without --force, or
    anything emo did not write even with it."""
    check_location(out)
    work = work_dir(out)
    if resume:
        if not (work / "state" / "state.json").exists():
            raise EmoError(f"{out}: no unfinished finetune to resume ({work}/state missing)")
        return
    if out.exists() or out.is_symlink():
        if not force:
            raise EmoError(f"{out} exists (pass --force to overwrite, or -o another name)")
        if out.is_symlink() or not (out / RECORD).is_file():
            raise EmoError(f"{out} exists and is not an emo finetune output; refusing to replace it (choose another -o)")
    if work.exists() and not (work / "state" / "state.json").exists():
        shutil.rmtree(work)  # stopped before its first checkpoint: nothing to resume
    if work.exists():
        if not force:
            raise EmoError(f"{work} holds an unfinished finetune; --resume to continue or --force to restart")
        shutil.rmtree(work)


def _windows_of(tokenizer, docs: list[Document], seq_len: int) -> list[Window]:
    return [w for ws in make_examples(tokenizer, docs, seq_len) for w in ws]


def _write_hf(model, dst: Path, dtype: torch.dtype, src: Path, raw_config: dict) -> None:
    save_hf_model(model, dst, dtype=dtype)
    copy_support_files(src, dst, raw_config)
    if (src / "pruning_metadata.json").is_file():
        shutil.copyfile(src / "pruning_metadata.json", dst / "pruning_metadata.json")


def finetune(model_dir: Path, data: list[str], out: Path, s: FinetuneSettings, *, device: str = "auto",
             resume: bool = False, force: bool = False, eval_data: list[str] = (), text_field: str | None = None,
             max_docs: int | None = None, save_checkpoint_0: bool = True, progress=None, log=None,
             command: str | None = None) -> dict:
    """Finetune the HF model in `model_dir` on `data` and write it to `out` with finetune.json (the
    record, also returned), FINETUNE.md and checkpoint-0/ (the input, unchanged).

    `progress(step, total, tokens, loss)` after every optimizer step; `log(msg)` for notices."""
    s.validate()
    model_dir, out = Path(model_dir), Path(out)
    device = resolve_device(device)
    precision = resolve_precision(s.precision, device)
    files = open_hf_dir(model_dir)
    cfg = files.config
    seq_len = min(s.seq_len, cfg.max_position_embeddings)
    check_output(out, resume, force)
    save_dtype = files.ckpt.dtype(files.names.embed)
    frozen_bf16 = precision == "bf16" and save_dtype == torch.bfloat16  # casting them is lossless only then
    need = memory_estimate(cfg, s.freeze, precision, s.micro_batch, seq_len, frozen_bytes=2 if frozen_bf16 else 4)
    have = available_memory(device)
    if need["total"] > have:
        raise EmoError(f"finetuning needs about {human_bytes(need['total'])} with --freeze {s.freeze} "
                       f"({human_bytes(need['optimizer'])} of optimizer state); {device} has {human_bytes(have)} "
                       "free. Freeze more (--freeze experts trains the least), or lower --micro-batch/--seq-len")

    tokenizer = EmoTokenizer.from_dir(model_dir, cfg.eos_token_id, cfg.pad_token_id)
    docs = read_documents(data, text_field, max_docs, shots=s.shots)
    train_docs, held_docs = heldout_split(docs, s.heldout_frac, salt="emo-finetune")
    train = _windows_of(tokenizer, train_docs, seq_len)
    sets = {"heldout": _windows_of(tokenizer, held_docs, seq_len)}
    for path in eval_data:
        sets[str(path)] = _windows_of(tokenizer, read_documents([path], text_field, max_docs), seq_len)
    empty = [k for k, v in sets.items() if not v]
    if not train or empty:
        raise EmoError(f"{'the training split' if not train else empty[0]} has no tokens to train or score "
                       "(chat rows without an assistant turn?)")
    fingerprint = s.fingerprint(files.fingerprint, data_hash(docs))
    raw_config = json.loads(files.config_text)

    model = load_resident(files, device, torch.float32)
    work = work_dir(out)
    state = {"format": STATE_FORMAT, "fingerprint": fingerprint, "step": 0, "tokens": 0, "seconds": 0.0,
             "history": [], "before": None}
    if not resume:
        work.mkdir(parents=True)
        if save_checkpoint_0:
            _write_hf(model, work / "checkpoint-0", save_dtype, model_dir, raw_config)
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name, s.freeze))
        if p.requires_grad:
            trained.append(p)
        elif frozen_bf16:
            p.data = p.data.to(torch.bfloat16)  # a frozen bf16 weight needs no fp32 copy
    opt = torch.optim.AdamW(trained, lr=s.lr, weight_decay=s.weight_decay)
    steps = total_steps(len(train), s)
    lb_weight = cfg.router_aux_loss_coef if cfg.output_router_logits else 0.0
    pad = tokenizer.pad_id
    ckpt = work / "state"

    def evaluate() -> dict:
        return {k: heldout_loss(model, v, pad, s.micro_batch, device, precision) for k, v in sets.items()}

    if resume:
        state = load_checkpoint(ckpt, model, opt, {"format": STATE_FORMAT, "fingerprint": fingerprint})
        if log:
            log(f"resuming {out} at step {state['step']} of {steps}")
    else:
        if log:
            log("scoring checkpoint 0 (the input model) on the held-out split")
        state["before"] = evaluate()
        save_checkpoint(ckpt, model, opt, state)

    log_every = max(1, steps // 50)
    t0 = time.perf_counter() - state["seconds"]
    for step in range(state["step"], steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, s)
        batch = [train[i] for i in step_windows(step, len(train), s)]
        loss, lb = train_step(model, opt, batch, pad, s, lb_weight, device, precision)
        state["step"], state["tokens"] = step + 1, state["tokens"] + sum(len(w.ids) for w in batch)
        state["seconds"] = time.perf_counter() - t0
        if state["step"] % log_every == 0 or state["step"] == steps:
            state["history"].append({"step": state["step"], "loss": round(loss, 5), "lb": round(lb, 5),
                                     "lr": lr_at(step, steps, s), "seconds": round(state["seconds"], 2)})
        if state["step"] % s.checkpoint_every == 0 and state["step"] < steps:
            save_checkpoint(ckpt, model, opt, state)
        if progress:
            progress(state["step"], steps, state["tokens"], loss)

    if log:
        log("scoring the finetuned model on the held-out split")
    after = evaluate()
    record = {
        "base_model": str(model_dir), "base_fingerprint": files.fingerprint, "data": [str(d) for d in data],
        "data_hash": data_hash(docs), "train_documents": len(train_docs), "heldout_documents": len(held_docs),
        "train_windows": len(train), "target_tokens_per_epoch": sum(sum(w.target[1:]) for w in train),
        "settings": {**asdict(s), "seq_len": seq_len, "precision": precision},
        "device": device, "threads": torch.get_num_threads(),
        "trained_parameters": need["trained_parameters"], "frozen_parameters": need["frozen_parameters"],
        "load_balancing_weight": lb_weight, "steps": state["step"], "tokens": state["tokens"],
        "train_seconds": round(state["seconds"], 1),
        "loss": {k: {"before": state["before"][k], "after": after[k]} for k in sets},
        "previous_finetunes": _previous(model_dir), "checkpoint_0": save_checkpoint_0,
        "command": command, "emo_version": __version__, "history": state["history"],
    }
    with staged_dir(out) as stage:
        _write_hf(model, stage, save_dtype, model_dir, raw_config)
        (stage / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        (stage / "FINETUNE.md").write_text(finetune_markdown(record))
        if save_checkpoint_0:
            shutil.move(str(work / "checkpoint-0"), str(stage / "checkpoint-0"))
    shutil.rmtree(work, ignore_errors=True)
    return record


def _previous(model_dir: Path) -> list[dict]:
    """The input's own finetune records, oldest first, so a chain of finetunes stays traceable."""
    try:
        prev = json.loads((model_dir / RECORD).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(prev, dict):
        return []
    keep = {k: prev.get(k) for k in ("base_model", "data", "data_hash", "settings", "steps")}
    return [*(prev.get("previous_finetunes") or []), keep]


def finetune_markdown(r: dict) -> str:
    st = r["settings"]
    lines = [f"# Finetuned from {r['base_model']}", "",
             f"- command: `{r['command'] or 'emo finetune'}`",
             f"- data: {', '.join(r['data'])} ({r['train_documents']} documents trained on, "
             f"{r['heldout_documents']} held out; hash {r['data_hash']})",
             f"- {r['steps']} steps of {st['batch_size']} examples, {st['epochs']} epoch(s), lr {st['lr']} "
             f"(linear, {st['warmup_ratio']:.0%} warmup), clip {st['grad_clip']}, weight decay {st['weight_decay']}, "
             f"{st['precision']} on {r['device']}, {r['train_seconds'] / 60:.1f} min",
             f"- trained: {r['trained_parameters']:,} parameters (--freeze {st['freeze']}); "
             f"frozen: {r['frozen_parameters']:,}",
             "", "| held-out set | loss before (checkpoint 0) | loss after | target tokens |", "|---|---|---|---|"]
    for k, v in r["loss"].items():
        lines.append(f"| {k} | {v['before']['loss']:.4f} | {v['after']['loss']:.4f} | {v['after']['tokens']:,} |")
    lines += ["", "Loss: mean nats per output token (the tokens finetuning trains on). Every setting and the "
              "loss curve: `finetune.json`; the input model, unchanged: `checkpoint-0/`.", ""]
    return "\n".join(lines)


def memory_help() -> str:
    """The sentence --help and the README give about memory, from memory_estimate."""
    est = dict(help_estimates())
    short = dict(help_estimates(seq_len=1024))["experts"]
    gib = lambda e: f"{e['total'] / 2**30:.1f}"  # noqa: E731
    return (f"Memory for the released model pruned to 25% ({est['none']['trained_parameters'] / 1e9:.1f}B "
            f"parameters), bf16 on a GPU, one 2048-token sequence per micro-batch: --freeze none {gib(est['none'])} GiB, "
            f"router {gib(est['router'])}, attention {gib(est['attention'])}, non-expert {gib(est['non-expert'])}, "
            f"experts {gib(est['experts'])} ({gib(short)} at --seq-len 1024). Full finetuning is an 80 GB GPU job "
            "(the AdamW moments alone are 8 bytes per parameter); on one 24 GB GPU use --freeze experts "
            "--micro-batch 1 --seq-len 1024.")
