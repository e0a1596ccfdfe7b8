"""Logit parity with llama.cpp, position by position: emo's CPU kernels vs llama.cpp, same GGUF.

    .venv/bin/python bench/parity.py --models slim-q8_0,slim-q4_k_m
    .venv/bin/python bench/parity.py --models full-q4_k_m --layers --json

Models are named as in bench/decode.py (slim-QUANT, full-QUANT, tiny-random-QUANT, PATH.gguf).
Both engines prefill the same random prompt and return every position's logits, with the same KV
cache type (`--kv`: f16, both engines' default, or f32); then both take one-token decode steps
after a prefill of `--prefix` tokens, to the end of the prompt. Per position: the largest |emo - llama.cpp| over the largest |logit|, how
many positions are bit-equal, and whether the argmax agrees. A flipped activation rounding
(Q8_0/Q8_K, 2^-8 of a block's largest value) after an fp32 ulp shows as ~1e-2 here; equal bits
mean emo took llama.cpp's order everywhere.

--layers localizes a difference: llama.cpp's intermediate tensors come from its eval callback
(every node is asked for, since asking for some only splits its graph where fused ops would run)
and each layer's output `l_out-i` is compared with emo's, layer by layer, prefill only.
emo follows the llama.cpp build for its own instruction set (AVX-512 VNNI or AVX2); the CPU's
flags are printed with the figures.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import KV_TYPES, cpu_flags, resolve_model  # noqa: E402

sys.path.pop(0)  # bench/profile.py would shadow the standard library's profile module


class _GGMLTensor(ctypes.Structure):  # ggml.h's struct ggml_tensor, up to its name
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def llama_prefill(path: Path, ids: list[int], kv: str, keep: tuple[str, ...] = ()) -> tuple[np.ndarray, dict]:
    """llama.cpp's logits [S, V] for every position of one prefill, and the F32 tensors whose names
    start with one of `keep` (the last node of each name) from its eval callback."""
    import llama_cpp as L

    got: dict[str, np.ndarray] = {}

    @L.ggml_backend_sched_eval_callback
    def observe(t, ask, _user):
        g = ctypes.cast(t, ctypes.POINTER(_GGMLTensor)).contents
        if ask:
            return bool(keep)
        name = g.name.decode(errors="replace")
        if g.type == 0 and g.data and name.startswith(keep):  # F32
            ne, nb = list(g.ne), list(g.nb)
            span = sum((ne[i] - 1) * nb[i] for i in range(1, 4)) + ne[0] * 4
            raw = np.frombuffer((ctypes.c_char * span).from_address(g.data), np.uint8)
            a = np.lib.stride_tricks.as_strided(raw, (ne[3], ne[2], ne[1], ne[0] * 4), (nb[3], nb[2], nb[1], 1))
            got[name] = np.ascontiguousarray(a).view(np.float32).reshape(-1, ne[0]).copy()
        return True

    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(256, len(ids))
    cp.n_threads = cp.n_threads_batch = 2
    cp.type_k = cp.type_v = getattr(L, f"GGML_TYPE_{kv.upper()}")
    cp.flash_attn_type = 0  # llama.cpp's default path without flash attention, as emo computes it
    cp.cb_eval = observe
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(len(ids), 0, 1)
    try:
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit(f"{path}: llama.cpp could not decode the prompt")
        V = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(ids), V)).copy()
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return logits, got


def llama_steps(path: Path, ids: list[int], prefix: int, kv: str) -> np.ndarray:
    """llama.cpp's logits [len(ids) - prefix, V] of one-token steps after a prefill of `prefix`."""
    import llama_cpp as L

    kv_type = getattr(L, f"GGML_TYPE_{kv.upper()}")
    llm = L.Llama(str(path), n_ctx=max(256, len(ids)), n_threads=2, type_k=kv_type, type_v=kv_type, verbose=False)
    llm.eval(ids[:prefix])
    out = []
    for t in ids[prefix:]:
        llm.eval([t])
        out.append(np.ctypeslib.as_array(L.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy())
    llm.close()
    return np.stack(out)


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Per-position agreement of two logit arrays [S, V]."""
    rel = np.abs(ours - ref).max(-1) / np.abs(ref).max(-1)
    return {"positions": len(ref), "bit_equal": int((rel == 0).sum()), "rel_median": float(np.median(rel)),
            "rel_max": float(rel.max()), "argmax_equal": int((ours.argmax(-1) == ref.argmax(-1)).sum()),
            "first_unequal": int(np.argmax(rel > 0)) if (rel > 0).any() else None}


def emo_run(path: Path, ids: list[int], prefix: int, kv: str, layers: bool) -> tuple[np.ndarray, np.ndarray, list]:
    """emo's prefill logits [S, V], its one-token steps after `prefix`, and (with `layers`) each
    layer's output [S, D] of the prefill."""
    import torch

    from emo_cli.gguf.runtime import load_gguf_model

    m = load_gguf_model(path, backend="cpu").model
    m.kv_dtype = {"f16": torch.float16, "f32": torch.float32}[kv]
    x = torch.tensor([ids])
    outs = []
    if layers:
        h = m.embed(x)
        for i in range(len(m.layers)):
            h = m.run_layers(h, i, i + 1)
            outs.append(h[0].numpy().copy())
        full = m.logits(h)[0].numpy()
    else:
        full = m(x)[0].numpy()
    cache = m.new_cache()
    m(x[:, :prefix], cache=cache)
    steps = np.stack([m(torch.tensor([[t]]), cache=cache)[0, -1].numpy() for t in ids[prefix:]])
    return full, steps, outs


def first_layer_difference(ours: list, theirs: dict) -> dict | None:
    for i, h in enumerate(ours):
        ref = theirs.get(f"l_out-{i}")
        if ref is None:
            return {"layer": i, "note": "llama.cpp reported no l_out tensor"}
        diff = np.abs(h - ref).max(-1)
        if (diff > 0).any():
            return {"layer": i, "positions": np.nonzero(diff)[0].tolist(), "max_abs": float(diff.max())}
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="slim-q8_0,slim-q4_k_m")
    ap.add_argument("--tokens", type=int, default=24, help="prompt tokens (prefill)")
    ap.add_argument("--prefix", type=int, default=8, help="tokens prefilled before the one-token steps")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prompt-vocab", type=int, default=390, help="prompt ids are drawn in [5, this)")
    ap.add_argument("--kv", choices=KV_TYPES, default="f16", help="KV cache type of both engines")
    ap.add_argument("--layers", action="store_true", help="also compare every layer's output (prefill)")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "emo" / "bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 0 < args.prefix < args.tokens:
        raise SystemExit("--prefix must be between 0 and --tokens")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    ids = [int(i) for i in np.random.default_rng(args.seed).integers(5, args.prompt_vocab, args.tokens)]
    rows = []
    for name in args.models.split(","):
        path = resolve_model(name, args.workdir)
        if path is None:
            continue
        full, steps, outs = emo_run(path, ids, args.prefix, args.kv, args.layers)
        ref_full, ref_inner = llama_prefill(path, ids, args.kv, ("l_out-",) if args.layers else ())
        row = {"model": name, "prefill": compare(full, ref_full),
               "decode": compare(steps, llama_steps(path, ids, args.prefix, args.kv))}
        if args.layers:
            row["first_layer_difference"] = first_layer_difference(outs, ref_inner)
        rows.append(row)
    if args.json:
        print(json.dumps({"simd": cpu_flags(), "tokens": args.tokens, "prefix": args.prefix, "kv": args.kv,
                          "results": rows}))
        return
    from emo_cli.ui import out, table

    table_rows = []
    for r in rows:
        for what in ("prefill", "decode"):
            c = r[what]
            table_rows.append([r["model"] if what == "prefill" else "", what, f"{c['bit_equal']} of {c['positions']}",
                               c["rel_median"], c["rel_max"], f"{c['argmax_equal']} of {c['positions']}"])
        if args.layers:
            table_rows.append(["", "first layer that differs", str(r["first_layer_difference"] or "none"), "", "", ""])
    out.print(table(f"emo vs llama.cpp logits, {args.tokens}-token prompt, steps after {args.prefix}, {args.kv} KV cache",
                    ["model", "", "positions bit-equal", "median |diff|/max", "max |diff|/max", "argmax equal"],
                    table_rows, justify_right_from=2))
    out.print(f"machine: {cpu_flags()}")


if __name__ == "__main__":
    main()
