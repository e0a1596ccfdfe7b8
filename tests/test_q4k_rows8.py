"""Q4_K matrices of 8-row multiples (cpu_q4k_rows8.h), against llama.cpp's repacked kernels.

llama.cpp (AVX2 and up) copies such a matrix into blocks that interleave 8 rows (block_q4_Kx8) and
multiplies them with ggml_gemv_q4_K_8x8_q8_K (one token) and ggml_gemm_q4_K_8x8_q8_K (4 tokens,
activations in its interleaved 4-row Q8_K format); a 2-D matmul of T tokens sends its first
T - T % 4 tokens through the gemm and the rest through the gemv. emo reads the GGUF layout in place
and must compute the same bits. The peer here is llama.cpp's own exported functions: the test
interleaves the weights itself (numpy, from the block format) and lets llama.cpp's exported
quantizers produce both activation formats.
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
from test_kquants import activations, random_blocks

pytestmark = needs_cpu_kernels

QK, BLOCK, X4_BLOCK, Q8K_BLOCK = 256, 144, 16 + 4 * 256 + 2 * 64, 292  # bytes: Q4_K, Q8_Kx4, Q8_K


@pytest.fixture(scope="module")
def ggml():
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    for name in ("ggml_gemv_q4_K_8x8_q8_K", "ggml_gemm_q4_K_8x8_q8_K", "ggml_quantize_mat_q8_K_4x8"):
        if not hasattr(lib, name):
            pytest.skip(f"this llama.cpp build exports no {name}")
    lib.ggml_cpu_init()
    i, p = ctypes.c_int, ctypes.c_void_p
    for name in ("ggml_gemv_q4_K_8x8_q8_K", "ggml_gemm_q4_K_8x8_q8_K"):
        getattr(lib, name).argtypes = [i, p, ctypes.c_size_t, p, p, i, i]
    lib.ggml_quantize_mat_q8_K_4x8.argtypes = [p, p, ctypes.c_int64]
    lib.quantize_row_q8_K.argtypes = [p, p, ctypes.c_int64]
    return lib


def scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins [..., 8] packed in 12 bytes [..., 12] (as in a Q4_K block)."""
    s = packed.astype(np.int32)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return sc, mn


def pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [..., 8] into the 12 bytes of a Q4_K block (scales_mins inverted)."""
    out = np.zeros(sc.shape[:-1] + (12,), np.int32)
    out[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = mn[..., 0:4] | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    return out.astype(np.uint8)


def interleave8(w: np.ndarray, k: int) -> np.ndarray:
    """Q4_K rows [n, k/256*144] -> llama.cpp's 8-row blocks, per group of 8 rows and super-block:
    the 8 d, the 8 dmin, 8 x 12 bytes (sub-block j: the 8 rows' scale and min of sub-block j,
    packed like one Q4_K's 8 sub-blocks), then the 8 rows' quants 8 bytes at a time."""
    n, nb = w.shape[0], k // QK
    blk = w.reshape(n // 8, 8, nb, BLOCK).transpose(0, 2, 1, 3)  # [group, super-block, row, bytes]
    sc, mn = scales_mins(blk[..., 4:16])  # [g, b, row, sub-block]
    scales = pack_scales(sc.swapaxes(-1, -2), mn.swapaxes(-1, -2))  # [g, b, sub-block, 12]
    qs = blk[..., 16:].reshape(n // 8, nb, 8, 16, 8).transpose(0, 1, 3, 2, 4)  # [g, b, chunk, row, 8]
    parts = [blk[..., 0:2], blk[..., 2:4], scales, qs]
    return np.ascontiguousarray(np.concatenate([p.reshape(n // 8, nb, -1) for p in parts], -1))


def theirs(ggml, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """llama.cpp's repacked 2-D matmul of x [T, k] with Q4_K rows w: gemm for the first T - T % 4
    tokens (4-row interleaved Q8_K), gemv with row-by-row Q8_K for the rest -> [T, n]."""
    T, k = x.shape
    n, nb = w.shape[0], k // QK
    packed = interleave8(w, k)
    y = np.zeros((T, n), np.float32)
    ng = T - T % 4
    if ng:
        act = np.zeros(ng // 4 * nb * X4_BLOCK, np.uint8)
        for g in range(ng // 4):
            ggml.ggml_quantize_mat_q8_K_4x8(x[4 * g].ctypes.data, act[g * nb * X4_BLOCK:].ctypes.data, k)
        ggml.ggml_gemm_q4_K_8x8_q8_K(k, y.ctypes.data, n, packed.ctypes.data, act.ctypes.data, ng, n)
    for t in range(ng, T):
        act = np.zeros(nb * Q8K_BLOCK, np.uint8)
        ggml.quantize_row_q8_K(x[t].ctypes.data, act.ctypes.data, k)
        out = np.zeros(n, np.float32)
        ggml.ggml_gemv_q4_K_8x8_q8_K(k, out.ctypes.data, n, packed.ctypes.data, act.ctypes.data, 1, n)
        y[t] = out
    return y


def test_repacked_weights_are_the_same_matrix():
    """The test's interleaving keeps every value: un-interleaving gives the rows back."""
    rng = np.random.default_rng(3)
    n, k = 16, 512
    w = random_blocks(rng, QT.Q4_K, n, k)
    p = interleave8(w, k)  # [g, b, 1152]
    d, dmin = p[..., 0:16].reshape(2, 2, 8, 2), p[..., 16:32].reshape(2, 2, 8, 2)
    packed_sc = p[..., 32:128].reshape(2, 2, 8, 12)  # [g, b, sub-block, 12]
    sc, mn = scales_mins(packed_sc)  # [g, b, sub-block, row]
    qs = p[..., 128:].reshape(2, 2, 16, 8, 8).transpose(0, 1, 3, 2, 4).reshape(2, 2, 8, 128)
    back = np.concatenate([d, dmin, pack_scales(sc.swapaxes(-1, -2), mn.swapaxes(-1, -2)), qs], -1)
    np.testing.assert_array_equal(back.transpose(0, 2, 1, 3).reshape(n, -1), w)


@pytest.mark.parametrize("T", [1, 4, 5, 7, 9])
@pytest.mark.parametrize("seed", [0, 1])
def test_matmul_equals_llama_cpp_repacked_kernels_to_the_bit(ggml, T, seed):
    """A 2-D matmul of T tokens on a 40-row Q4_K matrix (5 row blocks) equals llama.cpp's repacked
    gemm/gemv split, every output bit, in every build variant this CPU runs."""
    rng = np.random.default_rng(seed)
    n, k = 40, 1024
    w = random_blocks(rng, QT.Q4_K, n, k)
    x = activations(rng, T, k)
    want = theirs(ggml, w, x)
    qw = cpu.QWeight.from_array(w, int(QT.Q4_K), n, k)
    assert qw.qtype == cpu.Q4_K_R
    for v in cpu.supported_variants():
        y = torch.empty(T, n)
        lib = cpu.library(v)
        lib.emo_matmul(1, (ctypes.c_void_p * 1)(qw.ptr), (ctypes.c_int * 1)(qw.qtype), (ctypes.c_int64 * 1)(n), k,
                       torch.from_numpy(x).data_ptr(), T, (ctypes.c_void_p * 1)(y.data_ptr()))
        np.testing.assert_array_equal(y.numpy(), want, err_msg=v)


def test_large_integer_sums_round_alike(ggml):
    """Maximal nibbles, scales and activations push a super-block's integer sum past 2^24, where
    its conversion to fp32 rounds: both sides must convert the same exact integer."""
    rng = np.random.default_rng(4)
    n, k = 8, 512
    w = random_blocks(rng, QT.Q4_K, n, k)
    w3 = w.reshape(n, -1, BLOCK)
    w3[:, :, 4:16] = 0xFF  # every scale and min 63
    w3[:, :, 16:] = 0xFF  # every quant 15
    x = np.full((5, k), 3.0, np.float32)
    want = theirs(ggml, w, x)
    (y,) = cpu.matmul(torch.from_numpy(x), [cpu.QWeight.from_array(w, int(QT.Q4_K), n, k)])
    np.testing.assert_array_equal(y.numpy(), want)


def test_rows8_matmul_equals_dequantized_float64():
    """The block format through the 8-row path: a float64 matmul of gguf-py's dequantized weights
    with the Q8_K-rounded activations, up to fp32 summation, for a batch mixing both orders."""
    rng = np.random.default_rng(8)
    n, k, T = 48, 768, 6
    w = random_blocks(rng, QT.Q4_K, n, k)
    exact = torch.from_numpy(dequantize(w, QT.Q4_K).reshape(n, k).astype(np.float64))
    qw = cpu.QWeight.from_array(w, int(QT.Q4_K), n, k)
    assert qw.qtype == cpu.Q4_K_R
    x = torch.from_numpy(activations(rng, T, k))
    (y,) = cpu.matmul(x, [qw])
    xr = reference.q8_k_activations(x)
    ref = xr @ exact.t()
    scale = (xr.abs() @ exact.abs().t()).max()
    assert float((y.double() - ref).abs().max() / scale) < 1e-6


def test_only_8_row_multiples_take_the_repacked_order():
    """Picked as llama.cpp repacks: Q4_K with rows (of each matrix of a stack) a multiple of 8."""
    rng = np.random.default_rng(0)
    w = random_blocks(rng, QT.Q4_K, 24, 256)
    assert cpu.QWeight.from_array(w, int(QT.Q4_K), 24, 256).qtype == cpu.Q4_K_R
    assert cpu.QWeight.from_array(w, int(QT.Q4_K), 24, 256, matrix_rows=12).qtype == cpu.Q4_K
    assert cpu.QWeight.from_array(w[:12], int(QT.Q4_K), 12, 256).qtype == cpu.Q4_K


def test_a_2d_expert_takes_the_gemm_order_for_whole_4_token_groups_only():
    """A shared expert (flagged as a plain 2-D matmul) of 11 tokens runs tokens 0-7 in the gemm
    order and 8-10 in the gemv order, as llama.cpp's 2-D matmul does, even though the MoE hands
    it to the kernels 8 tokens at a time; routed experts run every token in the gemv order."""
    rng = np.random.default_rng(6)
    T, D, F = 11, 256, 512
    ws = [cpu.QWeight.from_array(random_blocks(rng, QT.Q4_K, r, c), int(QT.Q4_K), r, c) for r, c in ((F, D), (F, D), (D, F))]
    x = torch.from_numpy(activations(rng, T, D))
    experts, weights = torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1)
    routed = cpu.moe(x, experts, weights, cpu.MoEWeights(*[[w] for w in ws]))
    flagged = [[cpu.QWeight(w.ptr, w.qtype | cpu.MATMUL_2D, w.n, w.k, w.owner)] for w in ws]
    shared = cpu.moe(x, experts, weights, cpu.MoEWeights(*flagged))
    assert torch.equal(shared[8:], routed[8:])
    assert not torch.equal(shared[:8], routed[:8])
