"""emo's CPU kernels on K-quant (Q4_K, Q5_K, Q6_K), Q5_0 and BF16 weights, read in place.

Two independent references:
- llama.cpp's own CPU functions, called through ctypes on the same bytes: its activation
  quantizers (quantize_row_q8_0 / q8_K) and its row-by-row dot products (ggml_vec_dot_*). emo
  follows their summation order, so both must agree to the bit.
- gguf-py's dequantizers and a float64 matmul of the dequantized weights with the rounded
  activations (emo_kernels.reference): the block formats themselves.
Random block bytes are valid K-quant blocks once their fp16 scales are finite, so the weights are
drawn as raw bytes: every bit of every field is exercised, not only what a quantizer produces.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from emo_kernels import cpu, reference
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize
from kernel_support import needs_cpu_kernels

pytestmark = needs_cpu_kernels

KQUANTS = [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q5_0]
ACTIVATION = {QT.Q4_K: "q8_K", QT.Q5_K: "q8_K", QT.Q6_K: "q8_K", QT.Q5_0: "q8_0"}
ACT_BLOCK = {"q8_K": (256, 292), "q8_0": (32, 34)}  # (values, bytes)
ROUNDING = {QT.Q4_K: reference.q8_k_activations, QT.Q5_K: reference.q8_k_activations,
            QT.Q6_K: reference.q8_k_activations, QT.Q5_0: reference.q8_0_activations,
            QT.BF16: reference.bf16_activations}


def random_blocks(rng, qt: QT, rows: int, k: int) -> np.ndarray:
    """[rows, bytes per row] of random blocks with finite, moderate fp16 scales."""
    vals, nbytes = cpu.BLOCK[int(qt)]
    nb = rows * k // vals
    b = rng.integers(0, 256, (nb, nbytes), dtype=np.uint8)

    def scales(lo, hi):
        return (rng.random(nb) * (hi - lo) + lo).astype(np.float16).view(np.uint8).reshape(nb, 2)

    if qt in (QT.Q4_K, QT.Q5_K):
        b[:, 0:2], b[:, 2:4] = scales(1e-3, 1e-2), scales(1e-3, 1e-2)  # d, dmin
    elif qt == QT.Q6_K:
        b[:, 208:210] = scales(-1e-2, 1e-2)  # d last; its sign is free
    else:
        b[:, 0:2] = scales(-1e-1, 1e-1)
    return b.reshape(rows, -1)


def activations(rng, T: int, k: int) -> np.ndarray:
    """Rows of very different magnitudes, with a tie for the largest magnitude in one block."""
    x = (rng.standard_normal((T, k)) * 10.0 ** rng.integers(-3, 3, (T, 1))).astype(np.float32)
    x[0, 5] = -np.abs(x[0, :256]).max()  # Q8_K keeps the first value of largest magnitude
    x[0, 9] = -x[0, 5]
    return x


@pytest.fixture(scope="module")
def ggml():
    """llama.cpp's CPU library from llama-cpp-python (the peer); skipped without the extra."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    lib.ggml_cpu_init()  # fills the fp16 tables its dot products read
    return lib


def their_activation(ggml, name: str, x: np.ndarray) -> np.ndarray:
    vals, nbytes = ACT_BLOCK[name]
    out = np.zeros((x.shape[0], x.shape[1] // vals * nbytes), np.uint8)
    f = getattr(ggml, f"quantize_row_{name}")
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    for t in range(x.shape[0]):
        f(x[t].ctypes.data, out[t].ctypes.data, x.shape[1])
    return out


def our_activation(qt: QT, x: np.ndarray) -> np.ndarray:
    vals, nbytes = ACT_BLOCK[ACTIVATION[qt]]
    out = np.zeros((x.shape[0], x.shape[1] // vals * nbytes), np.uint8)
    lib = cpu.library()
    lib.emo_convert_rows(x.ctypes.data, x.shape[0], x.shape[1], int(qt), out.ctypes.data)
    return out


def their_dot(ggml, qt: QT, w_row: np.ndarray, act_row: np.ndarray, k: int) -> np.float32:
    f = getattr(ggml, f"ggml_vec_dot_{qt.name.lower().replace('_k', '_K')}_{ACTIVATION[qt]}")
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                  ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    s = np.zeros(1, np.float32)
    f(k, s.ctypes.data, 0, w_row.ctypes.data, 0, act_row.ctypes.data, 0, 1)
    return s[0]


@pytest.mark.parametrize("name", ["q8_0", "q8_K"])
def test_activation_rounding_equals_llama_cpp(ggml, name):
    rng = np.random.default_rng(1)
    x = activations(rng, 6, 1024)
    x[3] = 0.0  # an all-zero block
    qt = {"q8_0": QT.Q5_0, "q8_K": QT.Q4_K}[name]
    np.testing.assert_array_equal(our_activation(qt, x), their_activation(ggml, name, x))


@pytest.mark.parametrize("qt", KQUANTS, ids=lambda q: q.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_dot_products_equal_llama_cpp_to_the_bit(ggml, qt, seed):
    """Every output of a matmul (one token and a batch, which takes the multi-token loop) equals
    llama.cpp's vec_dot of the same weight row and its own quantization of the activation. 20 rows:
    llama.cpp repacks Q4_K matrices of 8-row multiples and sums them in another order
    (tests/test_q4k_rows8.py)."""
    rng = np.random.default_rng(seed)
    n, k = 20, 1024
    w = random_blocks(rng, qt, n, k)
    x = activations(rng, 5, k)
    acts = their_activation(ggml, ACTIVATION[qt], x)
    want = np.array([[their_dot(ggml, qt, w[r], acts[t], k) for r in range(n)] for t in range(5)])
    qw = cpu.QWeight.from_array(w, int(qt), n, k)
    for rows in (slice(0, 1), slice(0, 5)):
        (y,) = cpu.matmul(torch.from_numpy(x[rows]), [qw])
        np.testing.assert_array_equal(y.numpy(), want[rows])


@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda q: q.name)
def test_batches_of_8_or_more_tokens_equal_llama_cpp_tiled_kernel(ggml, qt):
    """From 8 tokens llama.cpp sends a K-quant matrix it did not repack (here 20 rows, so Q4_K too)
    through its tiled kernel: exact integer sums per super-block, then one rounded product, the
    mins in one fma, and acc = fma(res, d_x, acc). emo's matmul equals llama.cpp's own op to the
    bit for 8 to 40 tokens: one pass, a pass and a tail, several passes; on the AVX-512 build Q6_K
    also in 16-token panels, with a tail of up to 8 tokens or a zero-padded last panel."""
    from test_tiles import their_mul_mat

    rng = np.random.default_rng(int(qt))
    n, k = 20, 1024
    w = random_blocks(rng, qt, n, k)
    x = activations(rng, 40, k)
    qw = cpu.QWeight.from_array(w, int(qt), n, k)
    for T in (8, 9, 16, 17, 25, 40):
        (y,) = cpu.matmul(torch.from_numpy(x[:T]), [qw])
        np.testing.assert_array_equal(y.numpy(), their_mul_mat(ggml, int(qt), w, x[:T]), err_msg=f"T={T}")


@pytest.mark.parametrize("qt", KQUANTS + [QT.BF16], ids=lambda q: q.name)
def test_matmul_and_rows_equal_gguf_py_dequantized(qt):
    """The block formats: rows of the weights equal gguf-py's dequantization, and a matmul equals
    a float64 matmul of those weights with the rounded activation, up to fp32 summation."""
    rng = np.random.default_rng(7)
    n, k, T = 40, 512, 7
    if qt == QT.BF16:
        w = (rng.standard_normal((n, k)).astype(np.float32)).view(np.uint32)
        w = (w >> 16).astype(np.uint16).view(np.uint8).reshape(n, -1)
    else:
        w = random_blocks(rng, qt, n, k)
    exact = torch.from_numpy(dequantize(w, qt).reshape(n, k).astype(np.float64))
    qw = cpu.QWeight.from_array(w, int(qt), n, k)
    ids = torch.tensor([3, 0, n - 1, 3])
    assert torch.equal(cpu.get_rows(qw, ids).double(), exact[ids])
    x = torch.from_numpy(activations(rng, T, k))
    (y,) = cpu.matmul(x, [qw])
    ref = ROUNDING[qt](x) @ exact.t()
    scale = (ROUNDING[qt](x).abs() @ exact.abs().t()).max()
    assert float((y.double() - ref).abs().max() / scale) < 1e-6


@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K], ids=lambda q: q.name)
def test_moe_on_kquant_experts_equals_reference(qt):
    """The routed mixture on K-quant experts (gate/up against Q8_K activations, down against the
    Q8_K-rounded SwiGLU output) equals the float64 oracle with the same roundings."""
    rng = np.random.default_rng(11)
    E, S, T, D, F = 5, 2, 9, 256, 512
    lists, dense = [], []
    for rows, cols in ((F, D), (F, D), (D, F)):
        w = random_blocks(rng, qt, E * rows, cols)
        stacked = cpu.QWeight.from_array(w, int(qt), E * rows, cols)
        lists.append([stacked.slice_rows(e, rows) for e in range(E)])
        dense.append(torch.from_numpy(dequantize(w, qt).reshape(E, rows, cols)))
    layer = cpu.MoEWeights(*lists)
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    experts = torch.from_numpy(np.stack([rng.permutation(E)[:S] for _ in range(T)])).long()
    weights = torch.from_numpy(rng.random((T, S)).astype(np.float32))
    y = cpu.moe(x, experts, weights, layer)
    ref = reference.reference_moe_rounded(x, experts, weights, *dense, ROUNDING[qt], ROUNDING[qt])
    # up to an fp32 ulp in h flipping one rounding of the down projection's input
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-3


def test_q8_k_oracle_is_llama_cpp_rounding(ggml):
    """The float64 oracle's Q8_K rounding (reference.q8_k_activations) is llama.cpp's, value for value."""
    rng = np.random.default_rng(2)
    x = activations(rng, 4, 512)
    raw = their_activation(ggml, "q8_K", x).reshape(4, 2, 292)
    d = raw[..., :4].copy().view(np.float32)  # [4, 2, 1]
    qs = raw[..., 4:260].view(np.int8).astype(np.float64)
    theirs = (qs * d.astype(np.float64)).reshape(4, 512)
    np.testing.assert_array_equal(reference.q8_k_activations(torch.from_numpy(x)).numpy(), theirs)


def matmul_with(lib, x: torch.Tensor, w: cpu.QWeight) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.n)
    lib.emo_matmul(1, (ctypes.c_void_p * 1)(w.ptr), (ctypes.c_int * 1)(w.qtype), (ctypes.c_int64 * 1)(w.n), w.k,
                   x.data_ptr(), x.shape[0], (ctypes.c_void_p * 1)(y.data_ptr()))
    return y


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_0] + KQUANTS + [QT.BF16], ids=lambda q: q.name)
def test_every_instruction_set_variant_computes_the_same_bits(qt):
    """The library is built for the best instruction set the CPU reports (cpu.chosen_variant);
    for quantized and BF16 weights every variant this CPU can run gives the AVX2 build's results
    exactly (one token, a batch, and Q4_0 matrices of 8-row multiples, which take the repacked
    order). F32/F16 sums follow the lane count of llama.cpp's build for each instruction set, as
    the attention does, so they differ between variants as llama.cpp's builds do."""
    variants = cpu.supported_variants()
    if len(variants) < 2:
        pytest.skip(f"this CPU runs only {variants}: nothing to compare")
    rng = np.random.default_rng(5)
    n, k = 40, 512
    if qt in (QT.Q8_0, QT.Q4_0, QT.F16, QT.BF16):
        from gguf.quants import quantize

        w = quantize((rng.standard_normal((n, k)) * 0.1).astype(np.float32), qt)
        w = np.ascontiguousarray(w.view(np.uint8).reshape(n, -1))
    else:
        w = random_blocks(rng, qt, n, k)
    qw = cpu.QWeight.from_array(w, int(qt), n, k)
    base = cpu.library("avx2")
    for T in (1, 5):
        x = torch.from_numpy(activations(rng, T, k))
        want = matmul_with(base, x, qw)
        for v in variants[1:]:
            assert torch.equal(matmul_with(cpu.library(v), x, qw), want), (v, T)


def test_variant_choice_follows_the_cpu_flags(monkeypatch):
    """The build is picked from the flags the CPU reports, never assumed; EMO_CPU_KERNELS may only
    pick a variant this CPU runs."""
    assert cpu.supported_variants(frozenset({"avx2", "fma"})) == []  # no F16C: no kernels
    assert cpu.supported_variants(frozenset({"avx2", "fma", "f16c", "avx512f"})) == ["avx2"]
    full = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"})
    assert cpu.supported_variants(full) == ["avx2", "avx512vnni"]
    monkeypatch.setenv("EMO_CPU_KERNELS", "avx2")
    assert cpu.chosen_variant() == "avx2"
    monkeypatch.setenv("EMO_CPU_KERNELS", "sse9")
    with pytest.raises(cpu.KernelUnavailable, match="EMO_CPU_KERNELS=sse9"):
        cpu.chosen_variant()


def test_a_compiler_without_the_avx512_flags_falls_back_to_avx2(tmp_path, monkeypatch):
    """A CPU with AVX-512 VNNI but a compiler that rejects those flags still gets kernels: the
    AVX2 build."""
    if "avx512vnni" not in cpu.supported_variants():
        pytest.skip("this CPU has no AVX-512 VNNI: only the AVX2 build applies")
    cc = tmp_path / "old-gcc"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-mavx512vnni" ] && { echo "unknown flag" >&2; exit 1; }; done\n'
                  'exec gcc "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("EMO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EMO_CPU_KERNELS", raising=False)
    assert cpu.chosen_variant() == "avx2"
    assert "failed" in cpu._unbuildable[str(cc), "avx512vnni"]
    assert not list((tmp_path / "cache" / "kernels").glob("emo_cpu_avx512vnni_*"))
