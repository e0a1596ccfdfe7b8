"""emo's GGUF runtime equals emo's HF runtime (f32) and llama.cpp (f32, f16, q8_0, q4_0; K-quants,
Q5_0 and BF16 within their roundings)."""

import numpy as np
import pytest
import torch

from emo_cli.errors import EmoError
from emo_kernels import cpu
from emo_cli.gguf.export import export_gguf
from emo_cli.runtime import load_model
from kernel_support import cpu_param, llama_takes_our_simd_path, needs_cpu_kernels

TEXT = "The patient was given a dose of aspirin for acute pain. def return 42! theorem proof"
WIDE = dict(hidden_size=64, intermediate_size=64)  # rows of two quant blocks
KWIDE = dict(hidden_size=256, intermediate_size=256)  # rows of one K-quant super-block


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_factory):
    cache = {}

    def make(variant="shared", quant="f32", overrides=None):
        key = (variant, quant, tuple(sorted((overrides or {}).items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"g-{variant}-{quant}")
            if overrides:
                from tiny_models import write_tiny_model

                src = write_tiny_model(d / "hf", variant, 0, overrides=overrides)
            else:
                src = tiny_model_factory(variant)
            cache[key] = (src, export_gguf(src, d / f"{variant}-{quant}.gguf", quant)["output"])
        return cache[key]

    return make


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("variant", ["shared", "plain", "gqa"])
@pytest.mark.parametrize("backend", [cpu_param("cpu"), "torch"])
def test_f32_gguf_equals_hf_runtime(exported, variant, backend):
    src, path = exported(variant)
    hf, gg = load_model(src), load_model(path, backend=backend)
    ids = hf.tokenizer.encode(TEXT)
    assert gg.tokenizer.encode(TEXT) == ids
    assert gg.tokenizer.decode(ids) == hf.tokenizer.decode(ids) == TEXT
    assert gg.config.num_experts == hf.config.num_experts and gg.config.eos_ids == hf.config.eos_ids
    x = torch.tensor([ids])
    if backend == "cpu":  # its default fp16 KV cache (llama.cpp's) rounds keys and values: within 2^-11
        assert 1e-5 < rel(gg.model(x)[0], hf.model(x)[0]) < 5e-3
        gg.model.kv_dtype = torch.float32
    assert rel(gg.model(x)[0], hf.model(x)[0]) < 1e-5


def test_kv_cache_and_masking_on_gguf(exported):
    src, path = exported("shared")
    gg, hf = load_model(path, backend="cpu"), load_model(src)
    gg.model.kv_dtype = torch.float32  # compared with the fp32 HF runtime below
    x = torch.tensor([gg.tokenizer.encode(TEXT)])
    full = gg.model(x)
    cache = gg.model.new_cache()
    parts = [gg.model(x[:, :6], cache=cache)] + [gg.model(x[:, t:t + 1], cache=cache) for t in range(6, x.shape[1])]
    assert rel(torch.cat(parts, 1), full) < 1e-5
    keep = {i: [0, 2, 5, 7] for i in range(hf.config.num_hidden_layers)}  # 7 = the shared expert
    gg.model.set_expert_mask(keep)
    hf.model.set_expert_mask(keep)
    assert rel(gg.model(x)[0], hf.model(x)[0]) < 1e-5


@pytest.mark.parametrize("backend", [cpu_param("cpu"), "torch"])
def test_eval_and_profile_of_a_gguf(exported, med_data, backend):
    """The GGUF runtime implements the model interface: `emo eval X.gguf` and profiling work and
    give the HF model's numbers (f32 export: equal up to the kernels' summation order)."""
    from emo_cli.data.documents import read_documents
    from emo_cli.evaluation.loss import evaluate_loss
    from emo_cli.model.api import masks_for
    from emo_cli.experts.pipeline import run_profile

    src, path = exported("shared")
    gg, hf = load_model(path, backend=backend), load_model(src)
    gg.model.kv_dtype = torch.float32  # the CPU kernels' default fp16 cache would round keys and values
    docs = read_documents([str(med_data)])[:10]
    keep = {i: [0, 2, 5, 7] for i in range(hf.config.num_hidden_layers)}
    for kept in (None, keep):
        a = evaluate_loss(hf.model, hf.tokenizer, docs, seq_len=64, masks=masks_for(hf.model, kept))
        b = evaluate_loss(gg.model, gg.tokenizer, docs, seq_len=64, masks=masks_for(gg.model, kept))
        assert abs(a.loss - b.loss) / a.loss < 1e-5 and a.tokens == b.tokens
    pa = run_profile(hf, [str(med_data)], seq_len=64, batch_size=4, quiet=True)
    pb = run_profile(gg, [str(med_data)], seq_len=64, batch_size=4, quiet=True)
    assert torch.equal(pa.counts, pb.counts)
    assert rel(pb.prob, pa.prob) < 1e-5 and rel(pb.reap, pa.reap) < 1e-4


def test_eval_cli_on_a_gguf(exported, med_data, capsys):
    import json

    from test_cli import run

    src, path = exported("shared")
    code, out, err = run(["eval", src, path, "--data", med_data, "--seq-len", "64", "--json"], capsys)
    assert code == 0, err
    hf_res, gg_res = json.loads(out)["results"]
    # the GGUF runs on the CPU kernels with llama.cpp's default fp16 KV cache: keys and values
    # rounded to 2^-11, measured 2e-5 on the loss
    assert abs(hf_res["loss"] - gg_res["loss"]) / hf_res["loss"] < 5e-4


def test_bad_gguf_is_one_clear_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(EmoError, match="not a valid GGUF"):
        load_model(bad)


# ---- llama.cpp as the peer -------------------------------------------------------------------------
def llama_logits(path, ids, kv=torch.float16):
    """llama.cpp's logits at every position of one prefill, with a KV cache of `kv` (emo's default
    and llama.cpp's is fp16)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    kv_type = llama_cpp.GGML_TYPE_F16 if kv == torch.float16 else llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, type_k=kv_type, type_v=kv_type, logits_all=True,
                          verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)])
    llm.close()
    return out


def agree_modulo_ties(ours: np.ndarray, ref: np.ndarray) -> None:
    """Same argmax at every position, except where llama.cpp's own top two are closer than the
    difference between the engines (a tie that either engine may break)."""
    top2 = np.sort(ref, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    diff = np.abs(ours - ref).max(-1)
    same = ours.argmax(-1) == ref.argmax(-1)
    assert (same | (margin <= 2 * diff)).all(), np.nonzero(~same)


@needs_cpu_kernels
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0"])
def test_cpu_backend_equals_llama_cpp(exported, quant):
    """The CPU kernels do llama.cpp's arithmetic: activations rounded the same way (Q8_0 blocks
    for Q8_0/Q4_0 weights, fp16 for F16), dot products summed in the same order, RMSNorm, RoPE,
    exp and softmax computed alike, so where llama.cpp's build takes emo's SIMD path every logit
    agrees to the bit; elsewhere within the activations' rounding."""
    _, path = exported("shared", quant, WIDE)
    gg = load_model(path, backend="cpu")
    ids = gg.tokenizer.encode(TEXT)
    ref = llama_logits(path, ids)
    ours = gg.model(torch.tensor([ids]))[0].numpy()
    if llama_takes_our_simd_path():
        np.testing.assert_array_equal(ours, ref)
    per_pos = np.abs(ours - ref).max(-1) / np.abs(ref).max()
    assert np.median(per_pos) < (2e-3 if quant in ("f16", "f32") else 2e-2), per_pos
    assert per_pos.max() < (1e-3 if quant in ("f16", "f32") else 5e-2), per_pos
    agree_modulo_ties(ours, ref)
    if quant in ("q8_0", "q4_0"):  # without llama.cpp's activation rounding nothing is exact
        dense = load_model(path, backend="torch").model(torch.tensor([ids]))[0].numpy()
        assert np.median(np.abs(dense - ref).max(-1) / np.abs(ref).max()) > 1e-4


@needs_cpu_kernels
@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_0"])
def test_decode_steps_equal_llama_cpp(exported, quant):
    """Token-by-token decode (emo's one-call attention path) against llama.cpp's, same tokens fed."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, path = exported("shared", quant, WIDE)
    gg = load_model(path, backend="cpu")
    ids = gg.tokenizer.encode(TEXT)
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False)  # both: fp16 KV cache
    cache = gg.model.new_cache()
    gg.model(torch.tensor([ids[:6]]), cache=cache)
    llm.eval(ids[:6])
    ours, ref = [], []
    for t in ids[6:]:
        ours.append(gg.model(torch.tensor([[t]]), cache=cache)[0, -1].numpy())
        llm.eval([t])
        ref.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy())
    llm.close()
    ours, ref = np.stack(ours), np.stack(ref)
    if llama_takes_our_simd_path():  # every step in llama.cpp's order
        np.testing.assert_array_equal(ours, ref)
    per_pos = np.abs(ours - ref).max(-1) / np.abs(ref).max()
    assert per_pos.max() < (1e-3 if quant == "f32" else 5e-2), per_pos
    agree_modulo_ties(ours, ref)


def weights_in_place(model) -> dict[str, int]:
    """GGML type name -> how many of the layers' weight matrices the kernels read straight from the
    file map; raises if one was copied (dequantized at load)."""
    data = model.reader.data
    seen: dict[str, int] = {}
    for b in model.layers:
        owners = [m.w for m in (b.wq, b.wk, b.wv, b.wo)]
        for w in owners:
            assert isinstance(w.owner, np.ndarray) and np.shares_memory(w.owner, data), (b.i, w.qtype)
            name = cpu.NATIVE_TYPES[w.qtype & 0xFF]
            seen[name] = seen.get(name, 0) + 1
        assert all(isinstance(o, np.ndarray) and np.shares_memory(o, data) for o in b.moe.cpu_weights.owners)
    return seen


@needs_cpu_kernels
@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k", "q5_0", "bf16"])
def test_kquant_q5_0_bf16_run_in_place_and_agree_with_llama_cpp(exported, quant):
    """K-quants, Q5_0 and BF16 are computed from the mapped file (no weight is dequantized at
    load). Their logits agree with llama.cpp's within the activation roundings and its greedy
    choices, and they are far from the dequantized model with unrounded activations that emo used
    to run. q4_k_m: its Q4_K matrices (8-row multiples here) take llama.cpp's repacked gemm/gemv
    orders, so no activation rounding flips: the logits agree to a few fp32 ulps at every position
    (an 8-row-blind order left ~1e-2 at some)."""
    _, path = exported("shared", quant, KWIDE)
    gg = load_model(path, backend="cpu")
    types = weights_in_place(gg.model)
    want = {"q4_k_m": {"Q4_K", "Q6_K"}, "q6_k": {"Q6_K"}, "q5_0": {"Q5_0"}, "bf16": {"BF16"}}[quant]
    assert want <= set(types), types
    ids = gg.tokenizer.encode(TEXT)
    ref = llama_logits(path, ids)
    ours = gg.model(torch.tensor([ids]))[0].numpy()
    per_pos = np.abs(ours - ref).max(-1) / np.abs(ref).max()
    assert np.median(per_pos) < 2e-2 and per_pos.max() < 5e-2, per_pos
    if quant == "q4_k_m":
        assert per_pos.max() < 1e-5, per_pos
    agree_modulo_ties(ours, ref)
    dense = load_model(path, backend="torch").model(torch.tensor([ids]))[0].numpy()
    assert np.median(np.abs(dense - ref).max(-1) / np.abs(ref).max()) > np.median(per_pos)


@pytest.fixture(scope="module")
def attention_sized(tmp_path_factory):
    """A one-layer model with the released attention shapes (d 2048, 16 heads of 128) and small experts."""
    from tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("d2048") / "hf", "shared", 0, overrides=dict(
        hidden_size=2048, num_attention_heads=16, intermediate_size=256, num_hidden_layers=1))


def llama_decode_logits(path, ids, n_prefill, kv=torch.float16):
    """llama.cpp's logits [len(ids) - n_prefill, V] for one-token steps after a prefill of n_prefill."""
    llama_cpp = pytest.importorskip("llama_cpp")
    kv_type = llama_cpp.GGML_TYPE_F16 if kv == torch.float16 else llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, type_k=kv_type, type_v=kv_type, verbose=False)
    llm.eval(ids[:n_prefill])
    out = []
    for t in ids[n_prefill:]:
        llm.eval([t])
        out.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy())
    llm.close()
    return np.stack(out)


@needs_cpu_kernels
@pytest.mark.parametrize("quant,kv", [(q, torch.float16) for q in ("q8_0", "q4_0", "q4_k_m", "q6_k", "q5_0", "bf16",
                                                                   "f16", "f32")]
                         + [(q, torch.float32) for q in ("q8_0", "q4_k_m", "f32")], ids=str)
def test_prefill_and_decode_equal_llama_cpp_at_released_attention_shapes(attention_sized, tmp_path, quant, kv):
    """At the released attention shapes (d 2048, 16 heads of 128), a prefill and one-token steps
    after it give llama.cpp's logits to the bit where its build takes emo's SIMD path: its exp,
    softmax sums, lane orders, tiled K-quant and sgemm orders, all followed. llama.cpp itself sums
    some of a prefill in other orders than a one-token step (its tiled sgemm for the attention's
    p.V, its tiled K-quant kernel from 8 tokens, its repacked Q4_K gemm), so a step and the same
    position of a prefill agree within the activations' rounding, in both engines. Both with an
    fp16 KV cache (both engines' default: query and softmax weights rounded to it too) and fp32."""
    path = export_gguf(attention_sized, tmp_path / f"m-{quant}.gguf", quant)["output"]
    gg = load_model(path, backend="cpu")
    gg.model.kv_dtype = kv
    ids = np.random.default_rng(0).integers(0, 200, 24).tolist()
    full = gg.model(torch.tensor([ids]))[0].numpy()
    cache = gg.model.new_cache()
    gg.model(torch.tensor([ids[:4]]), cache=cache)
    steps = np.stack([gg.model(torch.tensor([[t]]), cache=cache)[0, -1].numpy() for t in ids[4:]])
    their_full, their_steps = llama_logits(path, ids, kv), llama_decode_logits(path, ids, 4, kv)
    if llama_takes_our_simd_path() and quant != "bf16":  # bf16: llama.cpp's AVX-512 BF16 dot is not followed
        np.testing.assert_array_equal(full, their_full)
        np.testing.assert_array_equal(steps, their_steps)
    else:
        assert rel(full, their_full) < 5e-2 and rel(steps, their_steps) < 5e-2
    # an fp32 ulp may flip an fp16 (2^-11: weights, or the query and weights p of an fp16 cache) or a
    # Q8_0/Q8_K (2^-8 of a block's largest value) rounding
    # (measured up to 2e-3 on the AVX-512 build and 4e-3 on the AVX2 one with an fp16 cache)
    tol = {"f32": 1e-2 if kv == torch.float16 else 1e-4, "f16": 1e-2 if kv == torch.float16 else 2e-3}.get(quant, 5e-2)
    assert rel(steps, full[4:]) < tol and rel(their_steps, their_full[4:]) < tol


TRITON_MODEL_SCRIPT = r"""
import json, sys, torch
from emo_cli.runtime import load_model
from emo_kernels.dispatch import moe_function
gguf, src = sys.argv[1], sys.argv[2]
hf = load_model(src)
ids = torch.tensor([hf.tokenizer.encode("The patient was given a dose of aspirin")])
ref = hf.model(ids)
tri = load_model(gguf, backend="triton").model(ids)
for blk in hf.model.moe_blocks().values():
    blk.moe_fn = moe_function("triton")
hf_tri = hf.model(ids)
rel = lambda a: float((a - ref).abs().max() / ref.abs().max())
print(json.dumps({"gguf_triton": rel(tri), "hf_triton": rel(hf_tri)}))
"""


def test_triton_backend_end_to_end_under_interpreter(exported):
    """`--backend triton` (GGUF runtime and HF model) on tiny shapes, via TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    src, path = exported("shared")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", TRITON_MODEL_SCRIPT, str(path), str(src)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    errs = json.loads(r.stdout.strip().splitlines()[-1])
    assert errs["gguf_triton"] < 1e-5 and errs["hf_triton"] < 1e-5, errs
