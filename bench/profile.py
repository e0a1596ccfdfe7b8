"""Cost of profiling and of loss-guided selection, measured against plain forwards in one run;
and data-parallel profiling under torchrun against one process.

    python bench/profile.py          # profiling overhead vs plain forward; greedy's cost on a
                                     # 16-layer, 127+1-expert, top-8 model (narrow, random weights)
    python bench/profile.py --procs 1,2,4   # `torchrun -m emo_cli profile` with N CPU processes
                                     # (cores / N threads each) on one synthetic model and data:
                                     # tokens/s of the pass and the ratio to one process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from emo_cli.arch.emo import EmoConfig
from emo_cli.data.documents import TokenBatch
from emo_cli.arch.emo import EmoForCausalLM
from emo_cli.experts.usage_profile import DataPart, ModelInfo, ProfileMeta, ProfileSettings, profile_model
from emo_cli.experts.search import greedy_plan, plan_loss
from emo_cli.experts.selection import Budget


def random_model(d, layers, experts, width, top_k, vocab, seed=0):
    cfg = EmoConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=max(1, d // 64),
                    intermediate_size=width, num_experts=experts, num_experts_per_tok=top_k, num_shared_experts=1)
    torch.manual_seed(seed)
    m = EmoForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0, 0.05 if "router" not in n else 0.3)
    return m.requires_grad_(False).eval()


def batches(vocab, n, seq, bs, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, bs):
        ids = torch.randint(0, vocab, (min(bs, n - s), seq), generator=g)
        out.append(TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), list(range(s, s + ids.shape[0]))))
    return out


def random_meta(model, bs) -> ProfileMeta:
    """What a profile of random tokens records."""
    return ProfileMeta(model=ModelInfo.of(model, "random", "bench"),
                       data=DataPart(sources=[], text_field=None, max_docs=None, docs=sum(len(b.doc_index) for b in bs),
                                     tokens=sum(int(b.mask.sum()) for b in bs), hash="random"),
                       settings=ProfileSettings(seq_len=bs[0].ids.shape[1], batch_size=bs[0].ids.shape[0],
                                                max_tokens=None))


def best_time(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def data_parallel(procs: list[int], docs: int, seq_len: int) -> None:
    """The same `emo profile` with 1..N torchrun processes; threads split so the cores are shared."""
    from pydoc_data.topics import topics

    from emo_cli.model.loading import EMBEDDED_MODELS, save_hf_model

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model = random_model(512, 8, 65, 512, 8, 8192)  # the embedded tokenizer's 8192 ids
        save_hf_model(model, work / "model", tokenizer_dir=EMBEDDED_MODELS["tiny-emo"])
        texts = [topics[k] for k in sorted(topics) if len(topics[k]) > 4 * seq_len][:docs]  # Python's manual
        (work / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        rows = []
        for n in procs:
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n)), "EMO_MODEL": ""}
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"] \
                if n > 1 else [sys.executable]
            cmd = launch + ["-m", "emo_cli", "profile", "data.jsonl", "--model", "model", "--seq-len", str(seq_len),
                            "--heldout-frac", "0", "-o", f"p{n}.profile.safetensors", "--json"]
            t = time.perf_counter()
            r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if r.returncode:
                sys.exit(f"{n} processes failed: {r.stderr.strip().splitlines()[-1:]}")
            out = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append((n, max(1, cores // n), out["tokens"], out["pass_s"], wall))
    base = rows[0][2] / rows[0][3]
    print(f"data-parallel emo profile ({cores} cores; d 512, 8 layers, 64+1 experts x 512, top-8; "
          f"{docs} docs x {seq_len} tokens)")
    print("procs  threads/proc  tokens  pass s  tok/s   vs 1 proc  wall s (with start-up)")
    for n, th, tok, s, wall in rows:
        print(f"{n:>5}  {th:>12}  {tok:>6}  {s:>6.1f}  {tok / s:>6.0f}  {tok / s / base:>8.2f}x  {wall:>6.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-evals", type=int, default=64)
    ap.add_argument("--procs", default=None, help="e.g. 1,2,4: data-parallel profiling under torchrun")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    if args.procs:
        data_parallel([int(p) for p in args.procs.split(",")], args.docs, args.seq_len)
        return

    # 1. profiling overhead: same batches, plain forward (no head) vs forward with the observer
    m = random_model(512, 4, 65, 256, 8, 8000)
    bs = batches(8000, 16, 256, 8, 0)
    meta = random_meta(m, bs)
    with torch.no_grad():
        plain = best_time(lambda: [m.hidden_states(b.ids) for b in bs], args.reps)
        prof = best_time(lambda: profile_model(m, bs, meta), args.reps)
    print(f"profiling: plain forward {plain:.3f} s, with profile statistics {prof:.3f} s, "
          f"overhead {100 * (prof / plain - 1):+.1f}% (target <= 10%)")

    # 2. greedy on a 16-layer, 127+1-expert, top-8 model (narrow so it runs on a laptop)
    g = random_model(64, 16, 128, 32, 8, 2000, seed=1)
    calib, held = batches(2000, 16, 128, 8, 1), batches(2000, 8, 128, 8, 2)
    p = profile_model(g, calib, random_meta(g, calib))
    with torch.no_grad():
        fwd = best_time(lambda: plan_loss(g, type("P", (), {"kept": None})(), held), 1)
    t = time.perf_counter()
    plan = greedy_plan(g, calib, held, [p], Budget.parse("25%"), "uniform", 8, max_evals=args.max_evals)
    wall = time.perf_counter() - t
    print(f"greedy (16 layers x 128 experts, keep 25%, max {args.max_evals} swap evals): "
          f"{plan.extra['evals']} evals = {plan.extra['forward_equivalents']} forward-pass equivalents "
          f"(held-out set); wall {wall:.1f} s = {wall / fwd:.1f} x one held-out forward ({fwd:.2f} s)")
    print(f"  seeds: { {k: round(v, 4) for k, v in plan.extra['seed_losses'].items()} } -> greedy "
          f"{plan.extra['heldout_loss']:.4f} ({len(plan.extra['swaps'])} swaps accepted)")


if __name__ == "__main__":
    main()
