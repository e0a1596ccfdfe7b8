"""Cost of profiling and of loss-guided selection, measured against plain forwards in one run.

    python bench/profile.py          # profiling overhead vs plain forward; greedy's cost on a
                                     # 16-layer, 127+1-expert, top-8 model (narrow, random weights)
"""

from __future__ import annotations

import argparse
import time

import torch

from emo_cli.config import EmoConfig
from emo_cli.data import TokenBatch
from emo_cli.models.emo import EmoForCausalLM
from emo_cli.profile import profile_model
from emo_cli.search import greedy_plan, plan_loss
from emo_cli.select import Budget


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


def best_time(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-evals", type=int, default=64)
    args = ap.parse_args()

    # 1. profiling overhead: same batches, plain forward (no head) vs forward with the observer
    m = random_model(512, 4, 65, 256, 8, 8000)
    bs = batches(8000, 16, 256, 8, 0)
    meta = {"model": {"fingerprint": "bench"}}
    with torch.no_grad():
        plain = best_time(lambda: [m.hidden_states(b.ids) for b in bs], args.reps)
        prof = best_time(lambda: profile_model(m, bs, meta), args.reps)
    print(f"profiling: plain forward {plain:.3f} s, with profile statistics {prof:.3f} s, "
          f"overhead {100 * (prof / plain - 1):+.1f}% (target <= 10%)")

    # 2. greedy on a 16-layer, 127+1-expert, top-8 model (narrow so it runs on a laptop)
    g = random_model(64, 16, 128, 32, 8, 2000, seed=1)
    calib, held = batches(2000, 16, 128, 8, 1), batches(2000, 8, 128, 8, 2)
    p = profile_model(g, calib, {"model": {"fingerprint": "bench"}})
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
