"""emo at the real model's scale: a synthetic Emo_1b14b_1T checkpoint on a small machine.

    .venv/bin/python bench/scale.py                            # 16 layers (27 GB) with --streaming auto,
                                                               # 4 layers with --streaming on and off
    .venv/bin/python bench/scale.py --write-only               # only write the checkpoints and the data
    .venv/bin/python bench/scale.py --full-modes auto,on       # 16 layers also forced to stream
    .venv/bin/python bench/scale.py --layers 2 --compare-layers 1 --json
    .venv/bin/python bench/scale.py --out-md /tmp/scale.md     # the table as markdown for docs/results.md
    .venv/bin/python bench/scale.py --gguf q8_0 --compare-layers 0   # the pipeline from a full-model GGUF
    python bench/scale.py --layers 4 --compare-layers 0 --full-modes auto,on --steps profile,prune,eval --device cuda

The checkpoint has the released Emo_1b14b_1T's config and tensor names (16 layers, d 2048,
127 routed + 1 shared experts of width 1024, top-8, 100278 vocabulary rows) in bf16, sharded like a
Hugging Face upload (model-0000i-of-0000N.safetensors of <= 5 GB + index), with random weights:
each tensor draws from its own seeded normal, so every expert differs. The tokenizer is an 8k BPE
(emo_cli.model.bpe) trained on Python's reference manual (pydoc topics), which also gives the documents;
pad/eos are its ids, as 100277/100257 do not exist in it. Everything is written once under
--workdir (emo-1b14b-<N>L/, tokenizer/, data/) and reused; `--layers N` writes N layers.

Each step (profile, prune, chat, eval) is one `emo` subprocess in a fresh scratch directory
(<workdir>/runs/<N>L-<mode>/, with each step's stdout/stderr); we sample its PEAK ANONYMOUS memory
(RssAnon, summed over the process tree every 50 ms). Peak RSS would count the memory-mapped weight
files, which are shared page cache the kernel can drop, not memory the process needs.
Tokens/s = tokens the step processed / its wall time, model loading included (profile: tokens
profiled; eval: tokens scored by the three models; chat: the 16 new tokens; prune: none).
With --gguf QUANT the source is a GGUF of the same shapes instead (bench/decode.py's synthetic
writer: random quant blocks, llama.cpp's type mix for q4_k_m, a small BPE; 14.5 GB for 16 layers
in q8_0): `emo profile --model X.gguf` runs on the quantized CPU kernels, `emo prune` cuts
slim-med.gguf straight from the file, and eval compares the full and slim GGUFs.
The --compare-layers variant runs with --streaming on and off: the ratio of their wall times is
the cost of streaming layer by layer, and their memory shows what streaming saves.
Disk: 27 GB (16 layers) + 7 GB (4 layers), plus ~12 GB while a 16-layer slim model and GGUF exist.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import torch
from pydoc_data.topics import topics
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/profile.py would shadow the standard library's profile

from bench.results_md import replace_block  # noqa: E402
from emo_cli.arch.emo import NAMES  # noqa: E402
from emo_cli.model.bpe import save_tokenizer, train_bpe  # noqa: E402
from emo_cli.data.documents import Document, heldout_split  # noqa: E402

GIB = 2**30
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"
CHAT_TOKENS = 16
DOC_CHARS = 3000  # per document: well over 256 tokens with an 8k-token BPE
STEPS = ("profile", "prune", "chat", "eval")
EXTRA_STEPS = ("greedy",)  # only when asked for with --steps: many passes over the model
DEPENDS = {"prune": "profile", "chat": "prune", "eval": "prune", "greedy": "profile"}
GREEDY_EVALS = 16


# ---- the synthetic checkpoint -----------------------------------------------------------------
def released_config(layers: int, eos: int, pad: int) -> dict:
    """Emo_1b14b_1T's config.json (the released field names and values) with `layers` decoder
    layers. pad/eos are the tokenizer's: the real ids 100277/100257 do not exist in our small BPE
    vocabulary."""
    return {"architectures": ["EmoForCausalLM"], "model_type": "emo",
            "auto_map": {"AutoConfig": "configuration_emo.EmoConfig",
                         "AutoModelForCausalLM": "modeling_emo.EmoForCausalLM"},
            "vocab_size": 100278, "hidden_size": 2048, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "intermediate_size": 1024, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "rope_scaling": None,
            "attention_bias": False, "attention_dropout": 0.0, "pad_token_id": pad, "eos_token_id": eos,
            "bos_token_id": None, "tie_word_embeddings": False, "num_experts": 128, "num_experts_per_tok": 8,
            "num_shared_experts": 1, "norm_topk_prob": False, "output_router_logits": True,
            "router_aux_loss_coef": 0.01, "torch_dtype": "bfloat16"}


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) in module order, as save_pretrained shards them; std 0 means ones (norms).
    With std 0.02 every attention and expert output has rms ~0.3-0.8, so the pre-norm residual
    stream grows slowly and stays finite over 16 layers. Router std 1/sqrt(d) gives logits of std
    ~1: routing depends on the token without collapsing onto a few experts."""
    d, f, e, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_experts"], cfg["vocab_size"]
    n = NAMES  # the released names, as emo's architecture table has them
    specs = [(n.embed, (v, d), 0.02)]
    for i in range(cfg["num_hidden_layers"]):
        specs += [(n.in_layer(i, n.attention[x]), (d, d), 0.02) for x in "qkvo"]
        specs.append((n.router_of(i), (e, d), d ** -0.5))
        for j in range(e):
            specs += [(n.expert_of(i, j, n.expert_projs[w]), shape, 0.02)
                      for w, shape in (("w_gate", (f, d)), ("w_up", (f, d)), ("w_down", (d, f)))]
        specs += [(n.in_layer(i, n.attention["attn_norm"]), (d,), 0.0), (n.in_layer(i, n.attention["ffn_norm"]), (d,), 0.0)]
    return specs + [(n.final_norm, (d,), 0.0), (n.lm_head, (v, d), 0.02)]


def make_tensor(name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    if std == 0.0:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # per-tensor seed: reproducible, experts differ
    return torch.randn(shape, generator=g, dtype=torch.bfloat16).mul_(std)  # bf16 draws: 2x faster than fp32


def write_checkpoint(out: Path, layers: int, tok_dir: Path, eos: int, pad: int) -> Path:
    """Write into <out>.tmp one shard at a time (memory ~1 shard: save_file writes from the tensors'
    memory), then rename, so an interrupted write is never mistaken for a complete checkpoint."""
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = released_config(layers, eos, pad)
    shards, size = [[]], 0
    for spec in tensor_specs(cfg):
        nbytes = 2 * int(torch.Size(spec[1]).numel())
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    n, weight_map, total, t0 = len(shards), {}, 0, time.time()
    for i, specs in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {name: make_tensor(name, shape, std) for name, shape, std in specs}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        (tmp / fname).chmod(0o644)  # save_file creates it 0600
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: fname for name in tensors})
        del tensors
        log(f"  {out.name}: shard {i}/{n} written ({total / 1e9:.1f} GB, {time.time() - t0:.0f} s)")
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, tmp / f)
    tmp.rename(out)
    return out


# ---- data and tokenizer ------------------------------------------------------------------------
def candidate_docs() -> list[str]:
    """English prose from Python's own reference manual (pydoc topics), cut into ~3000-char documents."""
    docs, cur = [], ""
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            cur += para.strip() + "\n\n"
            if len(cur) >= DOC_CHARS:
                docs.append(cur.strip())
                cur = ""
    return docs


def write_data(workdir: Path) -> tuple[Path, int, int]:
    """Tokenizer (8k BPE) + data/med.jsonl (18 documents, of which emo's hashed held-out split takes
    exactly 2 at --heldout-frac 0.1, so 16 x 256 tokens are profiled) + data/heldout.jsonl (4 others)."""
    tok_dir, data = workdir / "tokenizer", workdir / "data"
    texts = candidate_docs()
    if not (tok_dir / "tokenizer.json").exists():
        tok_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer(train_bpe(texts, vocab_size=8192), tok_dir, model_max_length=4096)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    if not (data / "heldout.jsonl").exists():
        long = [t for t in texts if len(tok.encode(t).ids) >= 256]
        cands = [Document(t, "med", i) for i, t in enumerate(long)]
        keep, held = heldout_split(cands, 0.1, salt="emo-profile:")
        med = [d.text for d in sorted(keep[:16] + held[:2], key=lambda d: d.index)]
        other = [d.text for d in keep[16:20]]
        k2, h2 = heldout_split([Document(t, "med", i) for i, t in enumerate(med)], 0.1, salt="emo-profile:")
        if (len(k2), len(h2)) != (16, 2):
            log(f"warning: emo's held-out split now gives {len(k2)} profiled / {len(h2)} held out")
        data.mkdir(parents=True, exist_ok=True)
        (data / "med.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in med))
        (data / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in other))
    return tok_dir, eos, pad


# ---- measuring one emo subprocess --------------------------------------------------------------
def process_tree(root: int) -> list[int]:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # exited while we looked
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        tree += frontier
    return tree


def rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_emo(cmd: list[str], cwd: Path, timeout: float, log_name: str) -> dict:
    """Run one command; returns rc, wall, peak anonymous bytes, stdout, the last stderr line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a timeout kills the whole tree
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sum(rss_anon(p) for p in process_tree(proc.pid)))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    (cwd / f"{log_name}.out").write_text(out)
    (cwd / f"{log_name}.err").write_text(err)
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if timed_out:
        last = "; ".join(filter(None, [f"timed out after {timeout:.0f} s", last]))
    elif proc.returncode < 0:
        last = "; ".join(filter(None, [f"killed by signal {-proc.returncode} (out of memory?)", last]))
    return {"rc": proc.returncode, "wall": wall, "peak": peak[0], "stdout": out, "error": last,
            "ok": proc.returncode == 0 and not timed_out}


# ---- one variant x streaming mode --------------------------------------------------------------
def step_command(step: str, emo: str, ckpt: Path, flags: list[str]) -> list[str]:
    gguf = ckpt.suffix == ".gguf"  # a GGUF source: the slim model is a GGUF of its own quant types
    return {"profile": [emo, "profile", "data/med.jsonl", "--model", str(ckpt), "--seq-len", "256", "--json", *flags],
            "prune": [emo, "prune", "--budget", "25%", *([] if gguf else ["--quant", "q8_0"]), "--json", *flags],
            "chat": [emo, "chat", "--model", "slim-med.gguf", "--prompt", "The patient",
                     "--max-new-tokens", str(CHAT_TOKENS), "--temperature", "0"],
            "eval": [emo, "eval", str(ckpt), *([] if gguf else ["slim-med"]), "slim-med.gguf", "--data",
                     "data/heldout.jsonl", "--seq-len", "256", "--json", *flags],
            "greedy": [emo, "prune", "--budget", "25%", "--method", "greedy", "--max-evals", str(GREEDY_EVALS),
                       "--dry-run", "--json", *flags]}[step]


def summarize(step: str, out: str) -> tuple[int | None, str]:
    """(tokens processed, a short result) from a step's stdout."""
    if step == "chat":  # one-shot mode prints only text, and ids past the 8k tokenizer decode to
        return CHAT_TOKENS, repr(out[:40])  # nothing; it stops early only at EOS, ~never at random
    r = json.loads(out)
    if step == "profile":
        return r["tokens"], f"{r['docs']} docs profiled, {r['heldout_docs']} held out{chosen(r.get('memory'))}"
    if step == "greedy":
        g, ev = r["greedy"], (r.get("eval") or {}).get("heldout") or {}
        return None, (f"greedy from {g['start']}: {g['evals']} evals, {g['forward_equivalents']} forward-equiv., "
                      f"held-out loss {ev.get('before', float('nan')):.3f} -> {ev.get('after', float('nan')):.3f}"
                      f"{chosen(r.get('memory'))}")
    if step == "prune":
        kept = sorted(set(r["kept_per_layer"].values()))
        ev = (r.get("eval") or {}).get("heldout")
        loss = f", held-out loss {ev['before']:.3f} -> {ev['after']:.3f}" if ev else ""
        return None, f"keep {kept[0]}/128, slim {r['bytes_after'] / 1e9:.2f} GB{loss}{chosen(r.get('memory'))}"
    plans = [chosen(m).removeprefix("; ") for m in (r.get("memory") or {}).values()]
    names = "full / slim / gguf" if len(r["results"]) == 3 else "full / slim gguf"
    return sum(x.get("tokens", 0) for x in r["results"]), "loss " + " / ".join(
        f"{x['loss']:.3f}" for x in r["results"] if "loss" in x) + f" ({names})" + \
        (f"; {' / '.join(plans)} (HF models)" if plans else "")


def chosen(memory: dict | None) -> str:
    """What emo's memory planner picked, from the step's JSON."""
    if not memory:
        return ""
    return f"; {'streamed' if memory['streaming'] else 'in memory'} {memory['dtype']}"


def warm_page_cache(ckpt: Path) -> None:
    """Read the checkpoint once when it fits in the page cache, so the mode that runs first does not
    pay the cold disk reads alone (the on/off comparison would favour whichever runs second)."""
    shards = sorted(ckpt.glob("*.safetensors"))
    if sum(p.stat().st_size for p in shards) > 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
        return
    for p in shards:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def run_variant(args, ckpt: Path, layers: int, mode: str) -> list[dict]:
    if ckpt.is_dir():
        warm_page_cache(ckpt)
    scratch = args.workdir / "runs" / f"{layers}L{'-' + args.gguf if args.gguf else ''}-{mode}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    (scratch / "data").symlink_to(args.workdir / "data")
    flags = ["--streaming", mode]
    if args.max_memory is not None:
        flags += ["--max-memory", str(args.max_memory)]
    if args.device is not None:
        flags += ["--device", args.device]
    rows, failed = [], set()
    for step in args.steps:
        row = {"variant": f"{layers}L" + (f" {args.gguf}" if args.gguf else ""), "layers": layers, "step": step, "mode": mode if step != "chat" else "-",
               "wall_s": None, "tokens": None, "tok_s": None, "peak_anon_gib": None}
        if DEPENDS.get(step) in failed or (DEPENDS.get(step) and DEPENDS[step] not in args.steps):
            row.update(ok=False, result=f"skipped (needs {DEPENDS[step]})")
            failed.add(step)
            rows.append(row)
            continue
        cmd = step_command(step, args.emo, ckpt, flags)
        log(f"[{layers}L {mode}] {step}: {shlex.join(cmd)}")
        r = run_emo(cmd, scratch, args.step_timeout, step)
        row.update(wall_s=round(r["wall"], 2), peak_anon_gib=round(r["peak"] / GIB, 3), ok=r["ok"])
        if r["ok"]:
            try:
                tokens, row["result"] = summarize(step, r["stdout"])
            except (ValueError, KeyError, TypeError) as e:  # output format changed: keep the measurement
                tokens, row["result"] = None, f"ok (unparsed output: {e!r})"
            if tokens is not None:
                row.update(tokens=tokens, tok_s=round(tokens / r["wall"], 1))
        else:
            failed.add(step)
            row["result"] = f"FAILED rc={r['rc']}: {r['error'][:200]}"
        log(f"    {row['wall_s']} s, peak anon {row['peak_anon_gib']} GiB: {row['result']}")
        rows.append(row)
    if not args.keep_scratch:  # the slim model and its GGUF are GBs; logs and JSON stay
        shutil.rmtree(scratch / "slim-med", ignore_errors=True)
        (scratch / "slim-med.gguf").unlink(missing_ok=True)
    return rows


# ---- report ------------------------------------------------------------------------------------
def comparisons(rows: list[dict], compare: int, full: int) -> list[str]:
    by = {(r["layers"], r["step"], r["mode"]): r for r in rows if r.get("ok")}
    lines = []
    for step in ("profile", "prune", "eval"):
        on, off = by.get((compare, step, "on")), by.get((compare, step, "off"))
        if on and off:
            lines.append(f"{compare}L {step}: streamed throughput = {off['wall_s'] / on['wall_s']:.2f}x in-memory "
                         f"(wall {on['wall_s']:.1f} s vs {off['wall_s']:.1f} s); peak anon "
                         f"{on['peak_anon_gib']:.2f} vs {off['peak_anon_gib']:.2f} GiB")
    for step in ("profile", "prune", "eval"):
        small = by.get((compare, step, "on"))
        big_mode = "on" if (full, step, "on") in by else "auto"
        big = by.get((full, step, big_mode))
        if small and big and full != compare:
            grow = big["peak_anon_gib"] - small["peak_anon_gib"]
            lines.append(f"{step} peak anon memory {compare}L (on) -> {full}L ({big_mode}): "
                         f"{small['peak_anon_gib']:.2f} -> {big['peak_anon_gib']:.2f} GiB "
                         f"({grow:+.2f} GiB for {full - compare} more layer(s))")
    return lines


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    mem = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    return f"{cpu}, {os.cpu_count()} cores, {mem / GIB:.1f} GiB RAM"


COLUMNS = [("variant", "variant"), ("step", "step"), ("streaming", "mode"), ("wall s", "wall_s"),
           ("tokens", "tokens"), ("tok/s", "tok_s"), ("peak anon GiB", "peak_anon_gib"), ("result", "result")]


def cell(v) -> str:
    return "" if v is None else str(v)


def markdown(rows, lines, command, when, gguf: str | None = None) -> str:
    source = (f"a {gguf} GGUF with the released 14B shapes (random quant blocks; profile on the quantized CPU "
              "kernels, prune cut straight from the file)") if gguf else \
        "a checkpoint with the released 14B shapes (27.1 GB bf16) on a machine with less memory than the model"
    out = [f"## emo at the real model's scale (synthetic Emo_1b14b_1T {gguf or 'checkpoint'}, bench/scale.py)", "",
           f"Every step of the pipeline on {source}; peak **anonymous** memory (RssAnon of the process "
           "tree), wall time with loading. How it is measured: `docs/scale.md`.", "",
           f"Command: `{command}`  ", f"Machine: {machine()}; {when}", "",
           "| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cell(r.get(k)).replace("|", "\\|") for _, k in COLUMNS) + " |" for r in rows]
    return "\n".join(out + [""] + [f"- {ln}" for ln in lines]) + "\n"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # stdout stays clean for --json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/work/scale-work"))
    ap.add_argument("--layers", type=int, default=16, help="layers of the main variant (run with --full-modes)")
    ap.add_argument("--full-modes", default="auto", help="streaming modes of the main variant, e.g. auto,on")
    ap.add_argument("--compare-layers", type=int, default=4, help="variant run with streaming on and off (0 = none)")
    ap.add_argument("--steps", default=",".join(STEPS), help="subset of " + ",".join(STEPS + EXTRA_STEPS) +
                    f" (greedy: prune --method greedy --max-evals {GREEDY_EVALS} --dry-run, after profile)")
    ap.add_argument("--max-memory", type=float, default=None, help="GiB; passed to emo profile/prune/eval")
    ap.add_argument("--device", default=None, help="e.g. cuda; passed to emo profile/prune/eval")
    ap.add_argument("--step-timeout", type=float, default=3600.0)
    ap.add_argument("--emo", default=str(Path(sys.executable).with_name("emo")), help="the emo executable")
    ap.add_argument("--gguf", default=None, choices=("q8_0", "q4_0", "q4_k_m", "q6_k"),
                    help="start from a synthetic full-model GGUF of this quant instead of the bf16 HF checkpoint")
    ap.add_argument("--write-only", action="store_true", help="write the checkpoints and data, run nothing")
    ap.add_argument("--keep-scratch", action="store_true", help="keep each run's slim model and GGUF")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--results-md", type=Path, default=None,
                    help="replace the scale block of this file (docs/results.md) with the table")
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    args.steps = [s for s in STEPS + EXTRA_STEPS if s in args.steps.split(",")]
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")

    tok_dir, eos, pad = write_data(args.workdir)
    plan = [(args.compare_layers, m) for m in ("on", "off")] if args.compare_layers else []
    plan += [(args.layers, m) for m in args.full_modes.split(",")]
    ckpts = {}
    for layers in sorted({l for l, _ in plan}):
        log(f"checkpoint {layers}L: writing or reusing under {args.workdir}")
        if args.gguf:
            from bench.decode import write_synthetic_gguf
            path = args.workdir / f"emo-1b14b-{layers}L-{args.gguf}.gguf"
            ckpts[layers] = path if path.exists() else write_synthetic_gguf(path, "full", args.gguf, layers=layers)
        else:
            ckpts[layers] = write_checkpoint(args.workdir / f"emo-1b14b-{layers}L", layers, tok_dir, eos, pad)
    if args.write_only:
        log("written: " + ", ".join(str(p) for p in ckpts.values()))
        return
    rows = [row for layers, mode in plan for row in run_variant(args, ckpts[layers], layers, mode)]
    lines = comparisons(rows, args.compare_layers, args.layers)
    if args.out_md:
        args.out_md.write_text(markdown(rows, lines, command, when, args.gguf))
    if args.results_md:  # the GGUF-source run has a block of its own
        replace_block(args.results_md, "scale-gguf" if args.gguf else "scale", markdown(rows, lines, command, when, args.gguf))
    if args.json:
        print(json.dumps({"command": command, "machine": machine(), "date": when, "rows": rows,
                          "comparisons": lines}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"emo on a synthetic Emo_1b14b_1T ({machine()})")
    for name, _ in COLUMNS:
        table.add_column(name, justify="right" if name in ("wall s", "tokens", "tok/s", "peak anon GiB") else "left")
    for r in rows:
        table.add_row(*(cell(r.get(k)) for _, k in COLUMNS), style=None if r.get("ok") else "red")
    console = Console(width=None if sys.stdout.isatty() else 160)  # piped: no wrapping at 80 columns
    console.print(table)
    for ln in lines:
        console.print(ln)


if __name__ == "__main__":
    main()
