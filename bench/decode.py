"""Decode and prefill speed and peak memory: emo's CPU kernels vs llama.cpp, same GGUF, same threads.

    .venv/bin/python bench/decode.py                       # tiny (if embedded) + slim q8_0/q4_0/q4_k_m/q6_k
    .venv/bin/python bench/decode.py --models slim-q4_0 --threads 2 --prompt 128 --decode 32 --json

Models:
  tiny              the embedded tiny model (emo_cli/assets/tiny-emo) exported to q8_0, when it exists
  tiny-random-q8_0  the tiny model's shapes (recipes/tiny-emo.toml: 4 layers, d 128, 31+1 experts of
                    width 64, top-4, vocabulary 8192) with random weights
  slim-QUANT        a synthetic EMO-shaped slim model: 16 layers, d 2048, 31 routed + 1 shared experts
                    of width 1024, top-8, vocabulary 100352, random weights written straight as quant
                    blocks (a few GB; written once into --workdir, reused after); QUANT is q8_0, q4_0,
                    q6_k, or q4_k_m (Q4_K with llama.cpp's Q6_K choices for attn_v, ffn_down, output)
  full-QUANT        the same with the released model's 127 routed + 1 shared experts (q4_k_m: ~8 GB)
  PATH.gguf         any GGUF file (e.g. `emo export --quant q4_k_m` or `q6_k` of a slim model)
Each (model, engine) pair runs in its own subprocess, so the peak memory of one does not leak into
the other. Both engines memory-map the file: touched weights count in their RSS (VmHWM) but are
shared and reclaimable, so the memory that matters is the peak anonymous RSS (RssAnon, sampled
every 2 ms by a thread). Greedy decoding (argmax) from the same random prompt; every generated
token is compared, and the table says where the two engines first differ. The first decode step
is a warm-up and not timed. Both engines keep the same KV cache type (--kv: f16, both engines'
default, or f32). The CPU's SIMD flags are printed with the figures: llama.cpp and emo pick their
kernels from them. Each file is read through the page cache before its runs, so neither engine
pays disk reads the other did not (a file evicted by earlier ones made emo's decode look 20% slower
on the 8 GB full-q4_k_m); a file larger than the memory available is flagged in the output.
Targets (issue 13): decode and prefill >= 1.0x llama.cpp, peak anonymous memory <= 0.1x the file,
load <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "slim": dict(layers=16, hidden=2048, heads=16, experts=32, shared=1, width=1024, top_k=8, vocab=100352),
    "tiny-random": dict(layers=4, hidden=128, heads=4, experts=32, shared=1, width=64, top_k=4, vocab=8192),
    # the released model's shapes: 127 routed + 1 shared experts per layer
    "full": dict(layers=16, hidden=2048, heads=16, experts=128, shared=1, width=1024, top_k=8, vocab=100352),
}
SYNTHETIC_QUANTS = ("q8_0", "q4_0", "q4_k_m", "q6_k")


# ---- synthetic slim model ------------------------------------------------------------------------
def _random_blocks(rng, rows: int, cols: int, qtype, std: float) -> np.ndarray:
    """[rows, cols] weights as raw GGUF blocks of `qtype`: random bytes for the quants and sub-block
    scales, with the fp16 super-scale(s) set so that the weights have standard deviation `std`
    (measured on a sample through gguf-py's dequantizer)."""
    from gguf.quants import dequantize

    vals, nbytes = cpu_block(qtype)
    nb = rows * cols // vals
    raw = rng.integers(0, 256, size=(nb, nbytes), dtype=np.uint8)

    def h(v):
        return np.full((nb, 1), v, dtype=np.float16).view(np.uint8)

    def put(d):  # write the super-scale d (and dmin, which centres unsigned quants) into every block
        if qtype.name in ("Q4_K", "Q5_K"):
            raw[:, 0:2], raw[:, 2:4] = h(d), h(d * (7.5 if qtype.name == "Q4_K" else 15.5))
        elif qtype.name == "Q6_K":
            raw[:, nbytes - 2:] = h(d)
        else:  # Q8_0, Q4_0, Q5_0: d first
            raw[:, 0:2] = h(d)

    put(1.0)
    sample = dequantize(raw[:min(nb, 256)].reshape(-1, nbytes), qtype)
    put(std / float(sample.std()))
    return raw.reshape(rows, -1)


def cpu_block(qtype) -> tuple[int, int]:
    """(values, bytes) of one block of a GGML type."""
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[qtype]


def tensor_type(quant: str, kind: str, layer: int, layers: int, cols: int):
    """The GGML type of a weight in a synthetic file: one type for q8_0/q4_0/q6_k; for q4_k_m the
    mix llama.cpp's quantizer writes (Q6_K for the output head, and for attn_v and ffn_down in the
    first and last eighth of the layers and every third layer between; Q4_K elsewhere). Rows that
    K-quant super-blocks do not tile fall back as llama.cpp's do: Q4_K -> Q5_0, Q6_K -> Q8_0."""
    from gguf import GGMLQuantizationType as QT

    if quant != "q4_k_m":
        qt = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q6_k": QT.Q6_K}[quant]
    elif kind == "output":
        qt = QT.Q6_K
    else:
        more_bits = layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2
        qt = QT.Q6_K if kind in ("attn_v", "ffn_down") and more_bits else QT.Q4_K
    if cols % 256:
        qt = {QT.Q4_K: QT.Q5_0, QT.Q6_K: QT.Q8_0}.get(qt, qt)
    return qt


def write_synthetic_gguf(path: Path, shape: str, quant: str, seed: int = 0, layers: int | None = None) -> Path:
    """Write a random model of SHAPES[shape] (with `layers` layers when given) in emo's GGUF layout
    (gguf/layout.py names and keys)."""
    import tempfile

    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFWriter

    from emo_cli.gguf import layout as gf
    from emo_cli.gguf.quants import QUANTS
    from emo_cli.model.bpe import save_tokenizer, train_bpe
    from emo_cli.arch.emo import EmoConfig
    from emo_cli.gguf.export import add_tokenizer

    s = dict(SHAPES[shape], **({"layers": layers} if layers else {}))
    L = s["layers"]

    def qt(kind, i=0):
        return tensor_type(quant, kind, i, L, F if kind == "ffn_down" else D)

    D, F, E, V = s["hidden"], s["width"], s["experts"], s["vocab"]
    Er = E - s["shared"]
    rng = np.random.default_rng(seed)
    cfg = EmoConfig(vocab_size=V, hidden_size=D, num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                    intermediate_size=F, num_experts=E, num_experts_per_tok=s["top_k"], num_shared_experts=1)
    tmp = path.with_name(path.name + ".tmp")
    w = GGUFWriter(tmp, gf.ARCH)
    w.add_name(f"synthetic-emo-{shape}")
    w.add_file_type(int(QUANTS[quant][0]))
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(F)
    w.add_leading_dense_block_count(0)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(D // s["heads"])
    w.add_vocab_size(V)
    w.add_expert_count(Er)
    w.add_expert_used_count(s["top_k"] - 1)
    w.add_expert_shared_count(1)
    w.add_expert_feed_forward_length(F)
    w.add_expert_weights_scale(1.0)
    w.add_uint32(gf.K_EMO_SHARED, 1)
    with tempfile.TemporaryDirectory() as td:  # a small real BPE vocabulary, padded to V rows
        texts = [f"the patient {i} was given a dose of aspirin; def f(x): return x * {i}" for i in range(200)]
        eos, pad = save_tokenizer(train_bpe(texts, vocab_size=400), Path(td), model_max_length=4096)
        cfg.eos_token_id, cfg.pad_token_id = eos, pad
        add_tokenizer(w, Path(td), V, cfg)
    plan = [(gf.TOKEN_EMBD, (V, D), qt("embd"), 0.02)]
    for i in range(L):
        plan += [(gf.blk(i, gf.ATTN_NORM), (D,), QT.F32, None), (gf.blk(i, gf.ATTN_Q), (D, D), qt("attn_q", i), 0.02),
                 (gf.blk(i, gf.ATTN_K), (D, D), qt("attn_k", i), 0.02), (gf.blk(i, gf.ATTN_V), (D, D), qt("attn_v", i), 0.02),
                 (gf.blk(i, gf.ATTN_OUT), (D, D), qt("attn_out", i), 0.02), (gf.blk(i, gf.FFN_NORM), (D,), QT.F32, None),
                 (gf.blk(i, gf.FFN_GATE_INP), (Er, D), QT.F32, 0.02),
                 (gf.blk(i, gf.FFN_GATE_EXPS), (Er, F, D), qt("ffn_gate", i), 0.02),
                 (gf.blk(i, gf.FFN_UP_EXPS), (Er, F, D), qt("ffn_up", i), 0.02),
                 (gf.blk(i, gf.FFN_DOWN_EXPS), (Er, D, F), qt("ffn_down", i), 0.02),
                 (gf.blk(i, gf.FFN_GATE_SHEXP), (F, D), qt("ffn_gate", i), 0.02),
                 (gf.blk(i, gf.FFN_UP_SHEXP), (F, D), qt("ffn_up", i), 0.02),
                 (gf.blk(i, gf.FFN_DOWN_SHEXP), (D, F), qt("ffn_down", i), 0.02)]
    plan += [(gf.OUTPUT_NORM, (D,), QT.F32, None), (gf.OUTPUT, (V, D), qt("output"), 0.02)]

    def build(shape, qtype, std):
        if qtype == QT.F32:
            if std is None:
                return np.ones(shape, np.float32)
            return (rng.standard_normal(shape, dtype=np.float32) * std)
        rows = int(np.prod(shape[:-1]))
        return _random_blocks(rng, rows, shape[-1], qtype, std).reshape(*shape[:-1], -1)

    from gguf.quants import quant_shape_to_byte_shape

    for name, shape, qtype, _ in plan:
        eshape = shape if qtype == QT.F32 else tuple(quant_shape_to_byte_shape(shape, qtype))
        dt = np.dtype(np.float32 if qtype == QT.F32 else np.uint8)
        w.add_tensor_info(name, eshape, dt, int(np.prod(eshape)) * dt.itemsize, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, qtype, std in plan:
        w.write_tensor_data(build(shape, qtype, std))
    w.close()
    os.replace(tmp, path)
    return path


def tiny_gguf(workdir: Path) -> Path | None:
    src = ROOT / "emo_cli" / "assets" / "tiny-emo"
    if not (src / "config.json").exists():
        return None
    from emo_cli.model.loading import open_hf_dir

    out = workdir / f"tiny-emo-{open_hf_dir(src).fingerprint[:12]}-q8_0.gguf"  # a retrained model gets a new file
    if not out.exists():
        from emo_cli.gguf.export import export_gguf

        export_gguf(src, out, "q8_0")
    return out


def resolve_model(name: str, workdir: Path) -> Path | None:
    """The GGUF file of a model name (see the module docstring), written first for a synthetic one;
    None (with a line on stderr) for `tiny` before the embedded model exists."""
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise SystemExit(f"{name}: no such GGUF file")
        return Path(name)
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "tiny":
        path = tiny_gguf(workdir)
        if path is None:
            print("tiny: emo_cli/assets/tiny-emo does not exist yet; skipped", file=sys.stderr)
        return path
    shape, _, quant = name.rpartition("-")
    if shape not in SHAPES or quant not in SYNTHETIC_QUANTS:
        raise SystemExit(f"unknown model {name!r} (tiny, tiny-random-QUANT, slim-QUANT with QUANT one of "
                         f"{', '.join(SYNTHETIC_QUANTS)}, or PATH.gguf)")
    path = workdir / f"{name}.gguf"
    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        write_synthetic_gguf(path, shape, quant)
    return path


# ---- workers (one process per engine and model) --------------------------------------------------
def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """The highest RssAnon seen by a 2 ms sampling thread (the kernel keeps no anonymous peak)."""

    def __init__(self):
        self.peak = status_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_bytes("RssAnon"))


def cpu_flags() -> str:
    """The SIMD features that decide both engines' kernels, from /proc/cpuinfo."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


KV_TYPES = ("f16", "f32")  # the KV cache type of both engines (f16: both engines' default)


def run_emo(path: Path, prompt: list[int], n_decode: int, threads: int, kv: str) -> dict:
    import torch

    from emo_cli.gguf.runtime import load_gguf_model
    from emo_kernels import cpu

    torch.set_num_threads(threads)
    cpu.set_threads(threads)
    anon = AnonPeak()
    t0 = time.perf_counter()
    m = load_gguf_model(path, backend="cpu").model
    load_s = time.perf_counter() - t0
    m.kv_dtype = {"f16": torch.float16, "f32": torch.float32}[kv]

    def step(ids, cache):  # argmax in numpy, as for llama.cpp's logits below
        h = m.hidden_states(torch.tensor([ids]), cache=cache)
        return int(m.logits(h[:, -1:])[0, -1].numpy().argmax())

    return _timed(step, m.new_cache, prompt, n_decode, load_s, anon)


def run_llama(path: Path, prompt: list[int], n_decode: int, threads: int, kv: str) -> dict:
    import llama_cpp

    anon = AnonPeak()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + n_decode + 16, n_batch=max(512, len(prompt)),
                          n_ubatch=max(512, len(prompt)), n_threads=threads, n_threads_batch=threads,
                          type_k=getattr(llama_cpp, f"GGML_TYPE_{kv.upper()}"),
                          type_v=getattr(llama_cpp, f"GGML_TYPE_{kv.upper()}"), verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def step(ids, _cache):
        llm.eval(ids)
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    def new_cache():
        llm.reset()  # the next eval drops every cached position from n_tokens = 0 on
        return None

    return _timed(step, new_cache, prompt, n_decode, load_s, anon)


def _timed(step, new_cache, prompt, n_decode, load_s, anon: AnonPeak) -> dict:
    cache = new_cache()  # warm-up: page the weights in, build kernels, grow buffers
    tok = step(prompt, cache)
    step([tok], cache)
    cache = new_cache()
    t0 = time.perf_counter()
    tok = step(prompt, cache)
    prefill_s = time.perf_counter() - t0
    toks = [tok]
    tok = step([tok], cache)  # first decode step: not timed
    t0 = time.perf_counter()
    for _ in range(n_decode):
        toks.append(tok)
        tok = step([tok], cache)
    decode_s = time.perf_counter() - t0
    toks.append(tok)
    return {"load_s": load_s, "prefill_tps": len(prompt) / prefill_s, "decode_tps": n_decode / decode_s,
            "peak_rss": status_bytes("VmHWM"), "peak_anon": anon.stop(), "tokens": toks}


# ---- driver --------------------------------------------------------------------------------------
def read_into_page_cache(path: Path) -> bool:
    """Read the whole file once (the page cache keeps it while memory allows); False when it is
    larger than the memory available, so the engines will read parts of it from disk."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    avail = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                 if ln.startswith("MemAvailable:"))
    return path.stat().st_size < avail


def same_prefix(a: list[int], b: list[int]) -> int:
    """How many greedy tokens agree before the first difference."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def worker(args) -> None:
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, args.prompt_vocab, size=args.prompt).tolist()
    fn = run_emo if args.worker == "emo" else run_llama
    print(json.dumps(fn(Path(args.model), prompt, args.decode, args.threads, args.kv)))


def measure(engine: str, path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(path), "--threads", str(args.threads),
           "--prompt", str(args.prompt), "--decode", str(args.decode), "--seed", str(args.seed),
           "--prompt-vocab", str(args.prompt_vocab), "--kv", args.kv]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"{engine} on {path.name} failed:\n{r.stderr[-2000:]}")
    return json.loads(lines[-1])


def best_of(path: Path, args) -> tuple[dict, dict]:
    """--repeat runs of each engine, alternated so load changes hit both alike; the fastest rate of
    each engine and the highest peak RSS are kept (the machine may be shared)."""
    runs = {"emo": [], "llama.cpp": []}
    for _ in range(args.repeat):
        for engine in runs:
            runs[engine].append(measure(engine, path, args))
    out = []
    for engine, rs in runs.items():
        best = dict(rs[0])
        for k in ("decode_tps", "prefill_tps", "peak_rss", "peak_anon"):
            best[k] = max(r[k] for r in rs)
        best["load_s"] = min(r["load_s"] for r in rs)
        out.append(best)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,tiny-random-q8_0,slim-q8_0,slim-q4_0,slim-q4_k_m,slim-q6_k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=32, help="timed decode steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-vocab", type=int, default=300, help="prompt ids are drawn below this")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "emo" / "bench")
    ap.add_argument("--repeat", type=int, default=1, help="runs per engine; the best rate is kept")
    ap.add_argument("--kv", choices=KV_TYPES, default="f16", help="KV cache type of both engines")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=["emo", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT))
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.models.split(","):
        path = resolve_model(name, args.workdir)
        if path is None:
            continue
        if not read_into_page_cache(path):
            print(f"{path.name}: larger than the memory available; both engines will read from disk", file=sys.stderr)
        emo, ref = best_of(path, args)
        size = path.stat().st_size
        rows.append({"model": name, "file_bytes": size, "threads": args.threads, "emo": emo, "llama.cpp": ref,
                     "decode_ratio": emo["decode_tps"] / ref["decode_tps"],
                     "prefill_ratio": emo["prefill_tps"] / ref["prefill_tps"],
                     "emo_rss_over_file": emo["peak_rss"] / size, "llama_rss_over_file": ref["peak_rss"] / size,
                     "emo_anon_over_file": emo["peak_anon"] / size, "load_ratio": emo["load_s"] / ref["load_s"],
                     "same_tokens": same_prefix(emo["tokens"], ref["tokens"]), "generated": len(emo["tokens"])})
    load = {"loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0], "cpus": os.cpu_count(),
            "simd": cpu_flags(), "kv": args.kv}
    if args.json:
        print(json.dumps({"machine": load, "results": rows}))
        return
    from emo_cli.ui import out, table

    table_rows = []
    for r in rows:
        e, l = r["emo"], r["llama.cpp"]
        table_rows += [
            [r["model"], "decode tok/s", e["decode_tps"], l["decode_tps"], r["decode_ratio"]],
            ["", "prefill tok/s", e["prefill_tps"], l["prefill_tps"], r["prefill_ratio"]],
            ["", f"peak RSS MB (file {r['file_bytes'] / 1e6:,.0f})", e["peak_rss"] / 1e6, l["peak_rss"] / 1e6,
             e["peak_rss"] / l["peak_rss"]],
            ["", "peak RSS / file", r["emo_rss_over_file"], r["llama_rss_over_file"], None],
            ["", "peak anonymous MB", e["peak_anon"] / 1e6, l["peak_anon"] / 1e6, e["peak_anon"] / l["peak_anon"]],
            ["", "peak anonymous / file", r["emo_anon_over_file"], l["peak_anon"] / r["file_bytes"], None],
            ["", "load s", e["load_s"], l["load_s"], r["load_ratio"]],
            ["", "greedy tokens equal", f"{r['same_tokens']} of {r['generated']}", "", None],
        ]
    out.print(table(f"emo CPU kernels vs llama.cpp: {args.threads} threads, prompt {args.prompt}, "
                    f"{args.decode} decode steps, {args.kv} KV cache", ["model", "", "emo", "llama.cpp", "emo / llama.cpp"],
                    table_rows, justify_right_from=2))
    out.print("targets: decode and prefill >= 1.0x; emo peak anonymous <= 0.1x the file; load <= 1 s")
    out.print(f"machine: {load['cpus']} CPUs ({load['simd']}), 1-min load average {load['loadavg_1min_before']:.1f} before, "
              f"{load['loadavg_1min_after']:.1f} after (other work on the machine slows both engines)")


if __name__ == "__main__":
    main()
