"""The CPU matmul kernels per weight type and instruction-set variant, side by side with the AVX2 build.

    .venv/bin/python bench/kernels.py                  # [8192, 2048] matrices, 1 and 4 tokens, 1 thread
    .venv/bin/python bench/kernels.py --rows 16384 --threads 2 --json
    .venv/bin/python bench/kernels.py --against HEAD~3   # each variant also built from another commit

emo builds its CPU library for the best instruction set the CPU reports (emo_kernels.cpu.VARIANTS,
chosen at run time); every variant computes the same bits (tests/test_kquants.py). This prints the
time of one matmul (x [T, K] against a [N, K] weight read in place, the activation conversion
included) for every variant this CPU runs, alternated and best of --repeat, the weight bytes
streamed per second, and the ratio of each variant's speed to the AVX2 build's. With --against REF,
every variant is also built from the kernel sources of git commit REF (columns "VARIANT@REF") and
alternated with the others: a before/after of a kernel change on one machine, in one process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]


def random_weight(rng, name: str, n: int, k: int) -> np.ndarray:
    """[n, bytes per row] of a GGML type: gguf-py's quantizer where it has one, else random blocks
    with small fp16 super-scales (every K-quant bit pattern is a valid block)."""
    from gguf import GGMLQuantizationType as QT
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import quantize

    qt = QT[name]
    if name in ("Q8_0", "Q4_0", "Q5_0", "F16", "BF16"):
        w = quantize((rng.standard_normal((n, k)) * 0.02).astype(np.float32), qt)
        return np.ascontiguousarray(w.view(np.uint8).reshape(n, -1))
    vals, nbytes = GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, (n * k // vals, nbytes), dtype=np.uint8)
    scale = np.full((len(b), 1), 1e-3, np.float16).view(np.uint8)
    if name == "Q6_K":
        b[:, -2:] = scale
    else:
        b[:, 0:2], b[:, 2:4] = scale, scale
    return b.reshape(n, -1)


def one_matmul(lib, x: torch.Tensor, w) -> float:
    y = torch.empty(x.shape[0], w.n)
    t0 = time.perf_counter()
    lib.emo_matmul(1, (ctypes.c_void_p * 1)(w.ptr), (ctypes.c_int * 1)(w.qtype), (ctypes.c_int64 * 1)(w.n), w.k,
                   x.data_ptr(), x.shape[0], (ctypes.c_void_p * 1)(y.data_ptr()))
    return time.perf_counter() - t0


def kernels_at(ref: str, tmp: Path):
    """emo_kernels.cpu as of git commit `ref` (its sources written to `tmp`), loaded as a module."""
    import importlib.util
    import subprocess

    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", ref, "kernels/"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith((".py", ".c", ".h")):
            blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{name}"], check=True, capture_output=True)
            (tmp / Path(name).name).write_bytes(blob.stdout)
    spec = importlib.util.spec_from_file_location(f"emo_kernels_at_{ref}", tmp / "cpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--against", metavar="REF", help="also time every variant built from git commit REF")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from emo_kernels import cpu
    from gguf import GGMLQuantizationType as QT

    variants = base = cpu.supported_variants()
    libs = {v: cpu.library(v) for v in variants}
    if args.against:
        import tempfile

        old = kernels_at(args.against, Path(tempfile.mkdtemp(prefix="emo-kernels-")))
        libs.update({f"{v}@{args.against}": old.library(v) for v in variants})
        variants = list(libs)
    for lib in libs.values():
        lib.emo_set_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.types.split(","):
        data = random_weight(rng, name, args.rows, args.cols)
        w = cpu.QWeight.from_array(data, int(QT[name]), args.rows, args.cols)
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, args.cols)
            best = {v: float("inf") for v in libs}
            for _ in range(args.repeat):  # alternated, so load changes hit every variant alike
                for v, lib in libs.items():
                    best[v] = min(best[v], one_matmul(lib, x, w))
            rows.append({"type": name, "tokens": T, "weight_bytes": int(data.nbytes),
                         "ms": {v: b * 1e3 for v, b in best.items()},
                         "gb_per_s": {v: data.nbytes / b / 1e9 for v, b in best.items()},
                         "speed_vs_avx2": {v: best["avx2"] / b for v, b in best.items()},
                         "speed_vs_ref": {v: best[f"{v}@{args.against}"] / best[v] for v in base} if args.against
                         else {}})
    machine = {"simd": " ".join(sorted(f for f in cpu.cpu_flags() if f.startswith(("avx", "fma", "f16c")))),
               "variants": variants, "chosen": cpu.chosen_variant(), "threads": args.threads}
    if args.json:
        print(json.dumps({"machine": machine, "results": rows}))
        return
    from emo_cli.ui import out, table

    cols = ["type", "tokens"] + [f"{v} ms" for v in variants] + [f"{v} GB/s" for v in variants] + \
        [f"{v} / avx2" for v in variants[1:]] + [f"{v} / {v}@{args.against}" for v in base if args.against]
    body = [[r["type"], r["tokens"], *[r["ms"][v] for v in variants], *[r["gb_per_s"][v] for v in variants],
             *[r["speed_vs_avx2"][v] for v in variants[1:]], *r["speed_vs_ref"].values()] for r in rows]
    out.print(table(f"one [{args.rows}, {args.cols}] matmul, {args.threads} thread(s), best of {args.repeat}",
                    cols, body, justify_right_from=1))
    out.print(f"CPU: {machine['simd']}; emo uses {machine['chosen']}")


if __name__ == "__main__":
    main()
