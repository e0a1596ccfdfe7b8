"""The Triton MoE kernel on a GPU at the released EMO shapes, against two peers in the same run.

    python bench/gpu.py                  # d 2048, 127 routed + 1 shared experts of width 1024, top-8, bf16
    python bench/gpu.py --experts 32     # a 25% slim model's layer (31 routed + 1 shared)
    python bench/gpu.py --json
    python bench/gpu.py --results-md docs/results.md   # replace the gpu-<experts> block there

For each token count T it times (CUDA events, median of --reps after warm-up and autotuning):
  triton   kernels/triton_moe.py (tokens sorted by expert, SwiGLU fused, one expert per block)
  grouped  kernels/grouped.py (emo's torch path: one matmul per active expert)
  naive    the Hugging Face style loop over ALL experts with a one-hot mask and torch.where
and checks triton and grouped against kernels/reference.py (float64, slot by slot) on the first
--check-tokens tokens: max |err| / max |ref|. Routing is EMO's: softmax over the routed experts,
top-8 not renormalised, plus the shared expert with weight 1.0. Needs a CUDA GPU and triton.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # not bench/: bench/profile.py shadows profile

from emo_kernels.grouped import grouped_moe  # noqa: E402
from emo_kernels.reference import reference_moe  # noqa: E402
from emo_kernels.triton_moe import triton_moe  # noqa: E402


def naive_moe(x, experts, weights, w_gate, w_up, w_down):
    E = w_gate.shape[0]
    out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    mask = F.one_hot(experts, num_classes=E).permute(2, 1, 0)  # [E, S, T]
    for e in range(E):
        slot, tok = torch.where(mask[e])
        xe = x[tok]
        h = F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())
        out.index_add_(0, tok, ((h @ w_down[e].t()) * weights[tok, slot, None]).float())
    return out.to(x.dtype)


def emo_routing(x, router, top_k):
    """EMO's routing: softmax over routed experts, top-k kept as is, shared expert (last id) at 1.0.
    -> experts [T, k+1], weights [T, k+1]."""
    probs = torch.softmax(x.float() @ router.float().t(), dim=-1)  # [T, E_r]
    w, e = probs.topk(top_k, dim=-1)
    shared = torch.full_like(e[:, :1], router.shape[0])
    return torch.cat([e, shared], 1), torch.cat([w, torch.ones_like(w[:, :1])], 1)


def time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


COLUMNS = ("tokens", "triton ms", "grouped ms", "naive ms", "triton TFLOP/s", "x grouped", "x naive",
           "err triton", "err grouped")


def cells(r: dict) -> list[str]:
    return [str(r["tokens"]), f"{r['triton_ms']:.3f}", f"{r['grouped_ms']:.3f}", f"{r['naive_ms']:.3f}",
            f"{r['triton_tflops']:.1f}", f"{r['vs_grouped']:.2f}", f"{r['vs_naive']:.2f}",
            f"{r['err_triton']:.1e}", f"{r['err_grouped']:.1e}"]


def markdown(info: dict, rows: list[dict]) -> str:
    out = [f"## Triton MoE kernel on {info['device']} ({info['shape']}, {info['dtype']}; bench/gpu.py)", "",
           f"Command: `{info['command']}` (torch {info['torch']}, triton {info['triton']}). "
           "Median CUDA-event time of one MoE layer; x = peer time / triton time; err = max |y - ref| / "
           "max |ref| against the float64 reference on the first 64 tokens.", "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(out + ["| " + " | ".join(cells(r)) + " |" for r in rows]) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--f", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=128, help="routed + 1 shared")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results-md", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    dev, dt = torch.device("cuda"), getattr(torch, args.dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    E, D, Fw = args.experts, args.d, args.f

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=dev) * std).to(dt)

    w_gate, w_up, w_down = rand(E, Fw, D), rand(E, Fw, D), rand(E, D, Fw)
    router = rand(E - 1, D, std=D ** -0.5)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        x = rand(T, D, std=1.0)
        experts, weights = emo_routing(x, router, args.top_k)
        n = min(T, args.check_tokens)
        ref = reference_moe(x[:n], experts[:n], weights[:n], w_gate, w_up, w_down)
        row = {"tokens": T,
               "err_triton": rel_err(triton_moe(x[:n], experts[:n], weights[:n], w_gate, w_up, w_down), ref),
               "err_grouped": rel_err(grouped_moe(x[:n], experts[:n], weights[:n], w_gate, w_up, w_down), ref)}
        for name, fn in (("triton", triton_moe), ("grouped", grouped_moe), ("naive", naive_moe)):
            row[f"{name}_ms"] = time_ms(lambda: fn(x, experts, weights, w_gate, w_up, w_down), args.reps)
        flops = 2 * 3 * T * (args.top_k + 1) * D * Fw
        row["triton_tflops"] = flops / row["triton_ms"] / 1e9
        row["vs_grouped"] = row["grouped_ms"] / row["triton_ms"]
        row["vs_naive"] = row["naive_ms"] / row["triton_ms"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "dtype": args.dtype,
            "shape": f"d {D}, {E - 1}+1 experts x {Fw}, top-{args.top_k}", "command": " ".join(sys.argv)}
    if args.results_md:
        from bench.results_md import replace_block
        replace_block(args.results_md, f"gpu-{E}", markdown(info, rows))
    if args.json:
        print(json.dumps({**info, "rows": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"Triton MoE on {info['device']} ({info['shape']}, {args.dtype})")
    for c in COLUMNS:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*cells(r))
    Console().print(t)


if __name__ == "__main__":
    main()
