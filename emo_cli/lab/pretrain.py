"""Small-scale pretraining of EMO-architecture models, with or without EMO's document-level pool.

Shape legend: B rows, S sequence length, T = B*S tokens, E experts of a layer (shared included),
R routed experts, G document segments in a batch, V vocab.

Documents are packed into rows, each followed by EOS; an EOS token starts the next document
segment (as EMO computes segments from EOS positions), so a document cut by a row boundary is two
segments. With the pool on, for every segment and MoE layer: the R routed experts are ranked by the
segment's summed routing probabilities, a pool size d ~ U{min_size..max_size} is drawn, and every
token of the segment routes top-k inside those d experts (router logits outside the pool are -inf
before the softmax: routing.route's `allowed` mask, per token). The shared expert always joins
with weight 1. Load balancing is global over the batch and over routed experts only:
(R/k)·dot(counts/T, mean masked probabilities); plus a small router z-loss.

Everything random is a function of (seed, step), so a resumed run continues exactly where a
checkpoint left it. Checkpoints are safetensors (weights, AdamW moments) plus a JSON state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from emo_cli.arch.emo import EmoConfig, EmoForCausalLM
from emo_cli.arch.layers import MoEBlock
from emo_cli.arch.routing import routed_mask
from emo_cli.data.documents import Document
from emo_cli.errors import EmoError
from emo_cli.evaluation.loss import evaluate_loss
from emo_cli.lab.corpus import build_corpus, domain_files, read_texts
from emo_cli.lab.pretrain_recipe import Recipe
from emo_cli.model.bpe import EOS_TOKEN, save_tokenizer, train_bpe
from emo_cli.model.loading import load_hf_model, save_hf_model
from emo_cli.model.tokenizer import EmoTokenizer
from emo_cli.training.shared import balance_loss, load_checkpoint, resolve_device, save_checkpoint
from emo_kernels.grouped import grouped_moe

CKPT_DIR = "checkpoint"
STATE_FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- the document pool -------------------------------------------------------------------------
class RouterHook:
    """MoEBlock.pool_fn for training: imposes the document pool (when enabled) and keeps each
    layer's raw logits and mask for the auxiliary losses."""

    def __init__(self, min_size: int, max_size: int, enabled: bool):
        self.min_size, self.max_size, self.enabled = min_size, max_size, enabled
        self.generator = torch.Generator()
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.sizes: dict[int, torch.Tensor] = {}  # layer -> [G] pool size drawn per segment

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        self.seen.clear()
        self.sizes.clear()

    def __call__(self, block: MoEBlock, logits: torch.Tensor, segments: torch.Tensor | None = None,
                 num_segments: int = 0) -> torch.Tensor | None:
        allowed = None
        if self.enabled and segments is not None:
            allowed = document_pool(logits, segments, num_segments, block.spec, self.min_size,
                                    self.max_size, self.generator, self.sizes, block.layer)
        self.seen[block.layer] = (logits, allowed)
        return allowed


@torch.no_grad()
def document_pool(logits, segments, num_segments, spec, min_size, max_size, generator, sizes=None, layer=0):
    """[T, E] bool mask: each segment's tokens may use its top-d routed experts (by summed
    routing probability) and every non-routed (shared) expert. The choice carries no gradient."""
    routed = routed_mask(spec, logits.device)  # [E]
    probs = F.softmax(logits[:, routed].float(), dim=-1)  # [T, R]
    mass = probs.new_zeros(num_segments, probs.shape[1]).index_add_(0, segments, probs)  # [G, R]
    d = torch.randint(min_size, max_size + 1, (num_segments,), generator=generator).to(logits.device)  # [G]
    order = torch.sort(mass, dim=1, descending=True, stable=True).indices  # [G, R]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order).contiguous())  # [G, R] rank of each expert
    in_pool = rank < d[:, None]  # [G, R]
    allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)  # [T, E]
    allowed[:, routed] = in_pool[segments]
    if sizes is not None:
        sizes[layer] = d
    return allowed


def segment_ids(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, int]:
    """[B, S] -> ([T] dense segment id per token, G); an EOS token opens a new segment."""
    B, S = ids.shape
    local = torch.cumsum((ids == eos_id).long(), dim=1)  # [B, S]
    flat = (torch.arange(B, device=ids.device)[:, None] * (S + 1) + local).reshape(-1)  # [T]
    uniq, inv = torch.unique(flat, return_inverse=True)
    return inv, int(uniq.numel())


def aux_losses(model: EmoForCausalLM, hook: RouterHook) -> tuple[torch.Tensor, torch.Tensor]:
    """(load balancing, router z-loss), each averaged over MoE layers. The balance uses the masked
    softmax, so probabilities are zero outside each document's pool."""
    lbs, zs = [], []
    for i, blk in model.moe_blocks().items():
        logits, allowed = hook.seen[i]
        routed = routed_mask(blk.spec, logits.device)  # [E]
        lbs.append(balance_loss(blk))
        lg = logits[:, routed].float()
        if allowed is not None:
            lg = lg.masked_fill(~allowed[:, routed], float("-inf"))
        zs.append(torch.logsumexp(lg, dim=-1).pow(2).mean())
    return torch.stack(lbs).mean(), torch.stack(zs).mean()


# ---- data --------------------------------------------------------------------------------------
def prepare_tokenizer(corpus_dir: Path, manifest: dict, domains: list[str], vocab_size: int,
                      seq_len: int) -> Path:
    """Train (once per corpus content and vocab size) the byte-level BPE on the training split."""
    key = json.dumps([vocab_size, [manifest["domains"][d]["train_sha256"] for d in domains]])
    tag = f"tokenizer-{vocab_size}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    tok_dir = Path(corpus_dir) / tag
    if (tok_dir / "tokenizer.json").exists():
        return tok_dir
    texts = [t for d in domains for t in read_texts(domain_files(corpus_dir, d)[0])]
    tok = train_bpe(texts, vocab_size)
    tmp = tok_dir.with_name(tok_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tokenizer(tok, tmp, model_max_length=seq_len)
    os.replace(tmp, tok_dir)
    return tok_dir


def pack_rows(docs: list[list[int]], eos_id: int, seq_len: int, seed: int) -> torch.Tensor:
    """Shuffle documents, append EOS to each, concatenate and cut into rows of seq_len+1 tokens."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream = [t for i in order for t in docs[i] + [eos_id]]
    n = len(stream) // (seq_len + 1)
    if n < 1:
        raise EmoError(f"corpus too small: {len(stream)} tokens for rows of {seq_len + 1}")
    return torch.tensor(stream[:n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


def batch_rows(step: int, num_rows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of `step`: a fresh seeded permutation per epoch, so any step is reproducible."""
    per_epoch = num_rows // batch_size
    if per_epoch < 1:
        raise EmoError(f"corpus has {num_rows} rows, fewer than batch_size {batch_size}")
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[pos * batch_size:(pos + 1) * batch_size]


# ---- model -------------------------------------------------------------------------------------
def model_config(recipe: Recipe, vocab_size: int, eos_id: int, pad_id: int) -> EmoConfig:
    m = recipe.model
    cfg = EmoConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
                    num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
                    max_position_embeddings=recipe.train.seq_len, rms_norm_eps=m.rms_norm_eps,
                    rope_theta=m.rope_theta, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
                    num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                    num_shared_experts=m.num_shared_experts, output_router_logits=True)
    cfg.validate()
    return cfg


def init_model(cfg: EmoConfig, std: float, seed: int) -> EmoForCausalLM:
    """Normal(0, std) weights; residual output projections scaled by 1/sqrt(2L) so the residual
    stream does not grow with depth; norms start at 1."""
    torch.manual_seed(seed)
    model = EmoForCausalLM(cfg)
    out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "w_down", "down_proj.weight")):
            torch.nn.init.normal_(p, 0.0, out_std)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, 0.0, std)
    return model


def lr_at(step: int, t) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def make_optimizer(model: EmoForCausalLM, t) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2))


# ---- the run -----------------------------------------------------------------------------------
def check_out_dir(out: Path, resume: bool, force: bool) -> None:
    ckpt = out / CKPT_DIR
    if out.exists() and not out.is_dir():
        raise EmoError(f"{out}: exists and is not a directory")
    if resume:
        if not (ckpt / "state.json").exists():
            raise EmoError(f"{out}: no checkpoint to resume from ({ckpt}/state.json missing)")
        return
    if force:
        shutil.rmtree(ckpt, ignore_errors=True)
        return
    if (out / "config.json").exists():
        raise EmoError(f"{out}: already holds a model; pass --force to overwrite it")
    if ckpt.exists():
        raise EmoError(f"{out}: holds a checkpoint of an unfinished run; --resume to continue or --force to restart")


def pretrain(recipe: Recipe, out: Path, resume: bool = False, force: bool = False, device: str = "auto",
             progress=None, log=None, keep_checkpoint: bool = False, command: str | None = None) -> dict:
    """Run `recipe` into `out` (HF model dir + training.json). Returns the training record.

    `progress(step, total, tokens, loss)` is called after every step; `log(msg)` gets notices.
    """
    out = Path(out)
    check_out_dir(out, resume, force)
    device = resolve_device(device)
    t, seed = recipe.train, recipe.train.seed
    corpus_dir = Path(recipe.corpus.dir)
    manifest = build_corpus(corpus_dir, recipe.corpus.spec(seed), log=log)
    domains = list(recipe.corpus.domains)
    tok_dir = prepare_tokenizer(corpus_dir, manifest, domains, recipe.tokenizer.vocab_size, t.seq_len)
    tokenizer = EmoTokenizer.from_dir(tok_dir)
    eos = tokenizer.tok.token_to_id(EOS_TOKEN)
    train_docs = [ids for d in domains for ids in tokenizer.encode_batch(read_texts(domain_files(corpus_dir, d)[0]))]
    rows = pack_rows(train_docs, eos, t.seq_len, seed)  # [N, S+1]

    cfg = model_config(recipe, tokenizer.vocab_size, eos, tokenizer.pad_id)
    model = init_model(cfg, recipe.model.init_std, seed).to(device)
    model.train()
    opt = make_optimizer(model, t)
    hook = RouterHook(recipe.pool.min_size, recipe.pool.max_size, recipe.pool.enabled)
    for blk in model.moe_blocks().values():
        blk.pool_fn = hook
        blk.moe_fn = grouped_moe  # the plain-torch path autograd trains through
    ckpt = out / CKPT_DIR
    state = {"format": STATE_FORMAT, "recipe_fingerprint": recipe.fingerprint(), "step": 0, "tokens": 0,
             "train_seconds": 0.0, "history": []}
    if resume:
        state = load_checkpoint(ckpt, model, opt, {"format": STATE_FORMAT, "recipe_fingerprint": recipe.fingerprint()})
        if log:
            log(f"resuming {out} at step {state['step']}")
    out.mkdir(parents=True, exist_ok=True)

    window: list[float] = []
    t0 = time.perf_counter() - state["train_seconds"]
    for step in range(state["step"], t.steps):
        idx = batch_rows(step, rows.shape[0], t.batch_size, seed)
        batch = rows[idx].to(device)
        x, y = batch[:, :-1], batch[:, 1:]  # [B, S]
        segments, G = segment_ids(x, eos)
        hook.reseed(seed * 1_000_003 + step + 1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        logits = model(x, segments=segments, num_segments=G)  # [B, S, V]
        ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        lb, z = aux_losses(model, hook)
        loss = ce + t.lb_weight * lb + t.z_weight * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        hook.seen.clear()  # release the graph's logits before the next step
        state["step"] = step + 1
        state["tokens"] += x.numel()
        state["train_seconds"] = time.perf_counter() - t0
        ce_val = ce.item()
        window.append(ce_val)
        if state["step"] % t.log_every == 0 or state["step"] == t.steps:
            state["history"].append({"step": state["step"], "ce": round(sum(window) / len(window), 4),
                                     "lb": round(lb.item(), 4), "z": round(z.item(), 3),
                                     "lr": round(lr_at(step, t), 6), "seconds": round(state["train_seconds"], 1)})
            window = []
        if state["step"] % t.checkpoint_every == 0 and state["step"] < t.steps:
            save_checkpoint(ckpt, model, opt, state)
        if progress:
            progress(state["step"], t.steps, state["tokens"], ce_val)

    for blk in model.moe_blocks().values():
        blk.pool_fn = None
    model.eval()
    record = finish(recipe, model, out, tok_dir, state, manifest, device, log, command)
    if not keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    else:
        save_checkpoint(ckpt, model, opt, state)
    return record


def heldout_losses(model, tokenizer, corpus_dir: Path, domains: list[str], seq_len: int) -> dict[str, float]:
    out = {}
    for d in domains:
        texts = read_texts(domain_files(corpus_dir, d)[1])
        docs = [Document(x, d, i) for i, x in enumerate(texts)]
        out[d] = round(evaluate_loss(model, tokenizer, docs, seq_len=seq_len).loss, 4)
    return out


def finish(recipe: Recipe, model, out: Path, tok_dir: Path, state: dict, manifest: dict, device: str, log,
           command: str | None) -> dict:
    """Write the HF model atomically (config.json last), reload it from disk and score held-out data."""
    t = recipe.train
    tmp = out / ".final.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_model(model, tmp, dtype=DTYPES[t.save_dtype], tokenizer_dir=tok_dir)
    (tmp / "recipe.toml").write_text(recipe.source_text)
    if log:
        log("scoring held-out documents of every domain")
    saved, _ = load_hf_model(tmp, device=device, dtype=torch.float32)
    tokenizer = EmoTokenizer.from_dir(tmp)
    tail = state["history"][-5:]
    record = {
        "recipe": recipe.name, "command": command, "recipe_fingerprint": recipe.fingerprint(), "document_pool":
            ({"min_size": recipe.pool.min_size, "max_size": recipe.pool.max_size} if recipe.pool.enabled else None),
        "steps": state["step"], "tokens": state["tokens"], "train_seconds": round(state["train_seconds"], 1),
        "tokens_per_second": round(state["tokens"] / max(state["train_seconds"], 1e-9)),
        "device": device, "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_ce": round(sum(h["ce"] for h in tail) / max(len(tail), 1), 4),
        "heldout_loss": heldout_losses(saved, tokenizer, Path(recipe.corpus.dir), list(recipe.corpus.domains), t.seq_len),
        "corpus": {d: {k: v for k, v in manifest["domains"][d].items() if k != "settings"}
                   for d in recipe.corpus.domains},
        "history": state["history"],
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (tmp / "TRAINING.md").write_text(training_markdown(record))
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    return record


def training_markdown(r: dict) -> str:
    """A short human-readable record next to training.json."""
    pool = r["document_pool"]
    lines = [f"# {r['recipe']}: how this model was trained", "",
             f"- command: `{r['command'] or 'emo pretrain --recipe recipe.toml'}` (recipe copy: `recipe.toml`)",
             "- document-level expert pool: " + (f"d ~ U{{{pool['min_size']}..{pool['max_size']}}} routed experts per "
                                                  "document and layer" if pool else "none (standard MoE)"),
             f"- {r['steps']} steps, {r['tokens']:,} tokens, {r['train_seconds'] / 60:.1f} min on {r['device']} "
             f"({r['threads']} threads, {r['tokens_per_second']:,} tokens/s), {r['parameters']:,} parameters",
             f"- final training loss (mean of the last logged windows): {r['final_train_ce']:.3f} nats/token",
             "- held-out loss (nats/token, each document alone, first context-length tokens): "
             + ", ".join(f"{d} {v:.3f}" for d, v in r["heldout_loss"].items()),
             "- corpus: " + "; ".join(f"{d} {c['train_docs']} docs / {c['train_chars']:,} chars ({c['source']})"
                                      for d, c in r["corpus"].items()),
             "", "Loss curve and every setting: `training.json`.", ""]
    return "\n".join(lines)
