"""Every MoE kernel equals the float64 reference on random shapes and routings.

Quantized weights are compared with the reference run on the dequantized weights (gguf-py's own
dequantizer, independent of the kernels) and with the matmul inputs rounded the way the kernel's
arithmetic (and llama.cpp's) rounds them; the unrounded reference bounds the total error.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from emo_kernels import cpu, dispatch
from kernel_support import needs_cpu_kernels
from emo_kernels.grouped import grouped_moe
from emo_kernels.reference import (f16_activations, q8_0_activations, reference_moe,
                                   reference_moe_rounded)

ROOT = Path(__file__).resolve().parent.parent
ACT = {QT.F32: lambda x: x.double(), QT.F16: f16_activations, QT.Q8_0: q8_0_activations, QT.Q4_0: q8_0_activations}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def encode(a: np.ndarray, qt: QT):
    """(bytes as the GGUF stores them, the exact weights they encode as a torch tensor)."""
    if qt == QT.F32:
        return a, torch.from_numpy(a)
    if qt == QT.F16:
        h = a.astype(np.float16)
        return h, torch.from_numpy(h.astype(np.float32))
    q = quantize(a, qt)
    return q, torch.from_numpy(dequantize(q, qt))


def random_experts(rng, E, F, D, qt):
    """Per-expert QWeights over stacked buffers (like GGUF exps tensors) + the exact dense weights."""
    lists, dense = [], []
    for rows, cols in ((F, D), (F, D), (D, F)):
        data, exact = encode((rng.standard_normal((E, rows, cols)) * 0.3).astype(np.float32), qt)
        stacked = cpu.QWeight.from_array(np.ascontiguousarray(data.reshape(E * rows, -1)), int(qt), E * rows, cols)
        lists.append([stacked.slice_rows(e, rows) for e in range(E)])
        dense.append(exact.reshape(E, rows, cols))
    return lists, dense


def routing(rng, T, S, E):
    experts = torch.from_numpy(np.stack([rng.permutation(E)[:S] for _ in range(T)])).long()
    weights = torch.from_numpy(rng.random((T, S)).astype(np.float32))
    return experts, weights


@needs_cpu_kernels
@pytest.mark.parametrize("qt", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_0], ids=lambda q: q.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_moe_equals_reference(qt, seed):
    rng = np.random.default_rng(seed)
    E = int(rng.integers(2, 9))
    S = int(rng.integers(1, E + 1))
    T = int(rng.integers(1, 20))
    D, F = 32 * int(rng.integers(1, 4)), 32 * int(rng.integers(1, 4))
    lists, (wg, wu, wd) = random_experts(rng, E, F, D, qt)
    layer = cpu.MoEWeights(*lists)
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    experts, weights = routing(rng, T, S, E)
    y, norms = cpu.moe(x, experts, weights, layer, return_norms=True)
    rounded = reference_moe_rounded(x, experts, weights, wg, wu, wd, ACT[qt], ACT[qt])
    # up to an fp32 ulp in h flipping one rounding of the down projection's input
    assert rel(y, rounded) < {QT.F32: 1e-6, QT.F16: 2e-4, QT.Q8_0: 1e-3, QT.Q4_0: 1e-3}[qt], (E, S, T, D, F)
    plain = reference_moe(x, experts, weights, wg, wu, wd)
    assert rel(y, plain) < {QT.F32: 2e-6, QT.F16: 5e-3, QT.Q8_0: 5e-2, QT.Q4_0: 5e-2}[qt]
    # per-slot norms are of the unweighted expert outputs
    one = reference_moe_rounded(x, experts[:, :1], torch.ones(T, 1), wg, wu, wd, ACT[qt], ACT[qt])
    assert torch.allclose(norms[:, 0].double(), one.norm(dim=1), rtol=1e-4)


@needs_cpu_kernels
def test_cpu_moe_unused_experts_and_shared_pointer_table():
    """Experts nobody picks are skipped; one expert may live in another buffer (the shared one)."""
    rng = np.random.default_rng(5)
    E, F, D, T = 6, 64, 64, 9
    routed, (wg, wu, wd) = random_experts(rng, E - 1, F, D, QT.Q8_0)
    shared, (sg, su, sd) = random_experts(rng, 1, F, D, QT.Q4_0)
    layer = cpu.MoEWeights(*[r + s for r, s in zip(routed, shared)])
    experts = torch.tensor([[1, E - 1]] * T)  # only experts 1 and the shared one
    weights = torch.tensor([[0.3, 1.0]] * T)
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    y = cpu.moe(x, experts, weights, layer)
    dense = [torch.cat([w, s]) for w, s in ((wg, sg), (wu, su), (wd, sd))]
    ref = reference_moe_rounded(x, experts, weights, *dense, q8_0_activations, q8_0_activations)
    assert rel(y, ref) < 2e-5
    res = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))  # residual added last
    assert torch.equal(cpu.moe(x, experts, weights, layer, residual=res), res + y)
    with pytest.raises(IndexError):
        cpu.moe(x, torch.full((T, 2), E), weights, layer)


@needs_cpu_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_step_takes_the_shared_expert_run_in_the_background(threads):
    """A decode step starts the shared expert in the background at the end of its attention call
    and the mixture takes that result: the stream equals a decoder that computes the shared expert
    inline, bit for bit, step after step. A mixture whose attention call did not start its own
    shared expert (another layer's ran last) computes it itself instead of taking a stale result."""
    rng = np.random.default_rng(11)
    D, H, hd, E, F, S = 64, 4, 16, 5, 96, 3

    def layer():
        mats = [cpu.QWeight.from_tensor(torch.from_numpy((rng.standard_normal((D, D)) * 0.2).astype(np.float32)))
                for _ in range(4)]
        router = cpu.QWeight.from_tensor(torch.from_numpy(rng.standard_normal((E - 1, D)).astype(np.float32)))
        norms = [torch.from_numpy(rng.random(D).astype(np.float32) + 0.5) for _ in range(2)]
        attn = cpu.AttentionWeights(*norms, *mats, H, H, hd, 1e-6, 10000.0, router)
        routed, _ = random_experts(rng, E - 1, F, D, QT.Q8_0)
        shared, _ = random_experts(rng, 1, F, D, QT.Q4_0)
        return attn, cpu.MoEWeights(*[r + s for r, s in zip(routed, shared)])

    layers = [layer(), layer()]
    before = cpu.threads()
    cpu.set_threads(threads)
    try:
        streams = {}
        for bg in (True, False):
            h, x, logits = torch.zeros(1, D), torch.zeros(1, D), torch.zeros(1, E)
            decs = [cpu.LayerDecoder(a, m, h, x, logits, shared=bg) for a, m in layers]
            caches = [(torch.zeros(1, H, 8, hd), torch.zeros(1, H, 8, hd)) for _ in layers]
            h.copy_(torch.from_numpy(rng.standard_normal((1, D)).astype(np.float32)) if bg else streams["init"])
            streams.setdefault("init", h.clone())
            out = []
            for pos in range(4):
                for i, (dec, (k, v)) in enumerate(zip(decs, caches)):
                    dec.attention(k, v, pos)
                    experts = torch.tensor([[(pos + i) % (E - 1), (pos + 2) % (E - 1), E - 1]])
                    dec.mixture(experts, torch.tensor([[0.6, 0.3, 1.0]]))
                    out.append(h.clone())
                decs[0].attention(*caches[0], pos)  # layer 0's shared expert in the background ...
                decs[1].mixture(torch.tensor([[0, E - 1]]), torch.tensor([[0.5, 1.0]]))  # ... not layer 1's
                out.append(h.clone())
                h.copy_(out[-2])
            streams[bg] = torch.cat(out)
        assert torch.equal(streams[True], streams[False])
    finally:
        cpu.set_threads(before)


@needs_cpu_kernels
@pytest.mark.parametrize("qt", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_0], ids=lambda q: q.name)
def test_cpu_matmul_and_get_rows(qt):
    rng = np.random.default_rng(3)
    K, T = 96, 7
    mats, exact = [], []
    for n in (40, 17, 64):  # matrices sharing one input run in one pass
        data, w = encode((rng.standard_normal((n, K)) * 0.5).astype(np.float32), qt)
        mats.append(cpu.QWeight.from_array(np.ascontiguousarray(data), int(qt), n, K))
        exact.append(w)
    x = torch.from_numpy(rng.standard_normal((T, K)).astype(np.float32))
    for y, w in zip(cpu.matmul(x, mats), exact):
        assert rel(y, ACT[qt](x) @ w.double().t()) < 2e-6
    ids = torch.tensor([3, 0, 39, 3])
    assert torch.equal(cpu.get_rows(mats[0], ids), exact[0][ids])
    with pytest.raises(IndexError):
        cpu.get_rows(mats[0], torch.tensor([40]))


def test_activation_rounding_matches_gguf_py_q8_0():
    """The oracle's Q8_0 activation rounding is the Q8_0 format gguf-py writes (up to ties)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 256)) * 3).astype(np.float32)
    theirs = dequantize(quantize(x, QT.Q8_0), QT.Q8_0)
    ours = q8_0_activations(torch.from_numpy(x)).numpy()
    step = np.abs(x).reshape(4, -1, 32).max(-1, keepdims=True) / 127
    diff = np.abs(ours - theirs).reshape(4, -1, 32)
    assert (diff <= step * 1.01).all() and (diff > step / 2).mean() < 0.01


def test_grouped_torch_equals_reference():
    rng = np.random.default_rng(7)
    E, F, D, T, S = 5, 24, 40, 11, 3
    w = [torch.from_numpy((rng.standard_normal(s) * 0.3).astype(np.float32)) for s in ((E, F, D), (E, F, D), (E, D, F))]
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    experts, weights = routing(rng, T, S, E)
    assert rel(grouped_moe(x, experts, weights, *w), reference_moe(x, experts, weights, *w)) < 2e-6


TRITON_SCRIPT = r"""
import json, sys, numpy as np, torch
from emo_kernels.triton_moe import triton_moe, align_by_expert, ALIGN
from emo_kernels.reference import reference_moe
out = []
for seed, (T, S, E, F, D) in enumerate([(1, 2, 3, 16, 32), (7, 3, 6, 40, 24), (20, 4, 9, 32, 48), (3, 1, 31, 16, 16)]):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    ex = torch.from_numpy(np.stack([rng.permutation(E)[:S] for _ in range(T)])).long()
    w = torch.from_numpy(rng.random((T, S)).astype(np.float32))
    ws = [torch.from_numpy((rng.standard_normal(s) * 0.3).astype(np.float32)) for s in ((E, F, D), (E, F, D), (E, D, F))]
    y = triton_moe(x, ex, w, *ws)
    ref = reference_moe(x, ex, w, *ws)
    ids, gran = align_by_expert(ex, E)
    runs_ok = bool(ids.numel() % ALIGN == 0 and sorted(ids[ids < T * S].tolist()) == list(range(T * S)))
    out.append({"shape": [T, S, E, F, D], "rel": float((y.double() - ref).abs().max() / ref.abs().max()),
                "layout": runs_ok})
print(json.dumps(out))
"""


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for case in json.loads(r.stdout.strip().splitlines()[-1]):
        assert case["layout"], case
        assert case["rel"] < 1e-5, case


def test_dispatch_resolves_once_with_clear_errors():
    assert dispatch.resolve("auto", "cpu", gguf=True) == ("cpu" if cpu.available() else "torch")
    assert dispatch.resolve("auto", "cpu", gguf=False) == "torch"
    assert dispatch.resolve("torch", "cpu", gguf=True) == "torch"
    assert dispatch.moe_function("torch") is grouped_moe
    with pytest.raises(dispatch.BackendError, match="unknown backend"):
        dispatch.resolve("fast", "cpu", gguf=True)
    with pytest.raises(dispatch.BackendError, match="CPU"):
        dispatch.resolve("cpu", "cuda", gguf=True)
    with pytest.raises(dispatch.BackendError, match="gguf"):
        dispatch.resolve("llama.cpp", "cpu", gguf=False)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(dispatch.BackendError, match="triton"):
            dispatch.resolve("triton", "cpu", gguf=True)


NO_COMPILER_SCRIPT = r"""
import sys, torch
from emo_kernels import cpu, dispatch
from emo_cli.runtime import load_model
assert not cpu.available()
print(dispatch.resolve("auto", "cpu", gguf=True))
try:
    dispatch.resolve("cpu", "cpu", gguf=True)
except dispatch.BackendError as e:
    print(e)
lm = load_model(sys.argv[1])  # --backend auto on a GGUF: the torch path, same numbers
print(lm.model.backend, float(lm.model.forward(torch.tensor([[1, 2, 3]])).double().abs().sum()))
"""


def test_without_a_compiler_auto_falls_back_to_torch(tmp_path, tiny_model_factory):
    """A machine where the kernels cannot build (no compiler; an ARM CPU is the same path): auto
    runs GGUFs on torch, and --backend cpu says why it cannot."""
    from emo_cli.gguf.export import export_gguf
    from emo_cli.runtime import load_model

    gguf = tmp_path / "m.gguf"
    export_gguf(tiny_model_factory("shared"), gguf, "f32")
    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"), EMO_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", NO_COMPILER_SCRIPT, str(gguf)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    auto, reason, last = r.stdout.strip().splitlines()
    assert auto == "torch" and "compiler" in reason and "unavailable" in reason
    backend, total = last.split()
    here = load_model(gguf, backend="torch").model.forward(torch.tensor([[1, 2, 3]])).double().abs().sum()
    assert backend == "torch" and float(total) == pytest.approx(float(here), rel=1e-6)


@needs_cpu_kernels
@pytest.mark.parametrize("hd", [16, 32, 64, 128])
@pytest.mark.parametrize("cache", [torch.float32, torch.float16], ids=str)
def test_cpu_attention_equals_float64_reference(hd, cache):
    """Causal attention on the CPU kernels (positions scored eight at a time, with a scalar tail)
    against a float64 softmax attention, for grouped heads and every query of a 21-token prefill
    that continues a 19-token cache. An fp16 cache also rounds the query and the softmax weights to
    fp16 (llama.cpp's order): the reference takes the rounded query, and p's rounding (2^-11
    relative) is the tolerance."""
    rng = np.random.default_rng(hd)
    H, Hkv, start, T = 4, 2, 19, 21
    q = torch.from_numpy(rng.standard_normal((T, H, hd)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((Hkv, start + T, hd)).astype(np.float32)).to(cache)
    v = torch.from_numpy(rng.standard_normal((Hkv, start + T, hd)).astype(np.float32)).to(cache)
    out = cpu.attention(q, k, v, start)
    tol = 1e-5 if cache == torch.float32 else 2e-3
    for t in range(T):
        n = start + t + 1
        for h in range(H):
            kh, vh = k[h // (H // Hkv), :n].double(), v[h // (H // Hkv), :n].double()
            p = torch.softmax(kh @ q[t, h].to(cache).double() / hd ** 0.5, 0)
            assert torch.allclose(out[t, h].double(), p @ vh, rtol=tol, atol=tol), (t, h)
