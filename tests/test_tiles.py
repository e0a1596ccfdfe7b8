"""The register-tiled kernels (kernels/cpu_tiles.h) compute the bits of the row-wise kernels they
replace, and of llama.cpp's own functions, for every token count of a pass (1..MAXT and a second
pass), row counts that leave tails, rows longer than the stack buffers, and every build variant.

- Q4_0 "R" (8 rows per pass): against emo's one-row path (dot_q4_seq: the same per-row order, no
  tiling) and against llama.cpp's 8x8 repacked gemv on the same weights repacked here.
- Q8_0 and Q6_K with several tokens: against llama.cpp's ggml_vec_dot_q8_0_q8_0 and
  ggml_vec_dot_q6_K_q8_K, row by row.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from emo_kernels import cpu
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize
from kernel_support import llama_takes_our_simd_path, needs_cpu_kernels

pytestmark = needs_cpu_kernels

MAXT = 8  # tokens per weight pass (cpu_dot.h)


def q_weights(rng, qt: QT, n: int, k: int) -> np.ndarray:
    w = quantize((rng.standard_normal((n, k)) * 0.1).astype(np.float32), qt)
    return np.ascontiguousarray(w.view(np.uint8).reshape(n, -1))


def matmul_with(lib, x: torch.Tensor, ptr: int, qtype: int, n: int, k: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], n)
    lib.emo_matmul(1, (ctypes.c_void_p * 1)(ptr), (ctypes.c_int * 1)(qtype), (ctypes.c_int64 * 1)(n), k,
                   x.data_ptr(), x.shape[0], (ctypes.c_void_p * 1)(y.data_ptr()))
    return y


def libs():
    return [cpu.library(v) for v in cpu.supported_variants()]


@pytest.fixture(scope="module")
def ggml():
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    lib.ggml_cpu_init()
    return lib


def their_q8_0(ggml, x: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0], x.shape[1] // 32 * 34), np.uint8)
    ggml.quantize_row_q8_0.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    for t in range(x.shape[0]):
        ggml.quantize_row_q8_0(x[t].ctypes.data, out[t].ctypes.data, x.shape[1])
    return out


# rows: one 8-row group, a 64-row work item plus a group, and a tail of 4 rows past the groups;
# k 8224: 257 blocks, more than the kernels' stack buffers hold
@pytest.mark.parametrize("n,k", [(8, 64), (72, 256), (36, 96), (16, 8224)])
def test_q4_0_r_equals_the_row_by_row_path(n, k):
    rng = np.random.default_rng(n + k)
    w = q_weights(rng, QT.Q4_0, n, k)
    row_bytes = w.shape[1]
    x = torch.from_numpy((rng.standard_normal((2 * MAXT + 1, k)) * 2).astype(np.float32))
    for lib in libs():
        for T in list(range(1, MAXT + 2)) + [2 * MAXT + 1]:
            y = matmul_with(lib, x[:T], w.ctypes.data, cpu.Q4_0_R, n, k)
            # one row per matrix never fills a group of 8: the untiled per-row loop, same order
            want = torch.stack([matmul_with(lib, x[:T], w.ctypes.data + r * row_bytes, cpu.Q4_0_R, 1, k)[:, 0]
                                for r in range(n)], 1)
            assert torch.equal(y, want), (T, n, k)


def repack_q4_0x8(w: np.ndarray, k: int) -> np.ndarray:
    """Q4_0 rows [n, nb*18] -> llama.cpp's 8-row interleaved layout for its 8x8 kernels: per group
    of 8 rows and block, the 8 fp16 scales, then 16 chunks of 8 quant bytes (chunk i: row i % 8,
    bytes 8 * (i // 8)..), each byte XOR 0x88 (nibbles stored as signed)."""
    n, nb = w.shape[0], k // 32
    blocks = w.reshape(n // 8, 8, nb, 18)
    d = blocks[..., :2]                                    # [g, 8 rows, nb, 2]
    qs = blocks[..., 2:].reshape(n // 8, 8, nb, 2, 8)      # [g, row, nb, half, 8]
    chunks = qs.transpose(0, 2, 3, 1, 4).reshape(n // 8, nb, 16, 8) ^ 0x88
    out = np.concatenate([d.transpose(0, 2, 1, 3).reshape(n // 8, nb, 16), chunks.reshape(n // 8, nb, 128)], -1)
    return np.ascontiguousarray(out.reshape(-1))


@pytest.mark.parametrize("n,k", [(8, 64), (64, 2048)])
def test_q4_0_r_decode_equals_llama_cpp_repacked_gemv(ggml, n, k):
    """One token: the same bits as llama.cpp's gemv on its repacked copy of the weights."""
    gemv = getattr(ggml, "_ZN4ggml3cpu6repack4gemvI10block_q4_0Ll8ELl8EL9ggml_type8EEEviPfmPKvS7_ii", None)
    if gemv is None:
        pytest.skip("this llama.cpp build exports no 8x8 Q4_0 gemv")
    gemv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
                     ctypes.c_int, ctypes.c_int]
    rng = np.random.default_rng(k)
    w = q_weights(rng, QT.Q4_0, n, k)
    packed = repack_q4_0x8(w, k)
    x = (rng.standard_normal((3, k)) * 3).astype(np.float32)
    acts = their_q8_0(ggml, x)
    for t in range(3):
        want = np.zeros(n, np.float32)
        gemv(k, want.ctypes.data, n, packed.ctypes.data, acts[t].ctypes.data, 1, n)
        for lib in libs():
            y = matmul_with(lib, torch.from_numpy(x[t:t + 1]), w.ctypes.data, cpu.Q4_0_R, n, k)
            np.testing.assert_array_equal(y[0].numpy(), want)


def their_vec_dots(ggml, name: str, w: np.ndarray, acts: np.ndarray, k: int) -> np.ndarray:
    """[tokens, rows]: llama.cpp's ggml_vec_dot_<name> of every weight row with every activation row."""
    f = getattr(ggml, f"ggml_vec_dot_{name}")
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                  ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    s = np.zeros(1, np.float32)
    want = np.zeros((len(acts), len(w)), np.float32)
    for t in range(len(acts)):
        for r in range(len(w)):
            f(k, s.ctypes.data, 0, w[r].ctypes.data, 0, acts[t].ctypes.data, 0, 1)
            want[t, r] = s[0]
    return want


class GGMLGraph:
    """llama.cpp's own CPU ops on our arrays: tensors in a ggml context, one graph computed on one
    thread by libggml-cpu, whatever path its build takes for those shapes."""

    def __init__(self, ggml, mem_bytes: int):
        import llama_cpp

        class InitParams(ctypes.Structure):
            _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        base.ggml_init.restype, base.ggml_init.argtypes = vp, [InitParams]
        base.ggml_new_tensor_2d.restype, base.ggml_new_tensor_2d.argtypes = vp, [vp, ctypes.c_int, i64, i64]
        for name in ("ggml_mul_mat",):
            getattr(base, name).restype, getattr(base, name).argtypes = vp, [vp, vp, vp]
        base.ggml_soft_max.restype, base.ggml_soft_max.argtypes = vp, [vp, vp]
        base.ggml_new_graph.restype, base.ggml_new_graph.argtypes = vp, [vp]
        base.ggml_build_forward_expand.argtypes = [vp, vp]
        base.ggml_get_data.restype, base.ggml_get_data.argtypes = vp, [vp]
        base.ggml_free.argtypes = [vp]
        ggml.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
        self.base, self.ggml = base, ggml
        self.ctx = base.ggml_init(InitParams(mem_bytes + (64 << 20), None, False))

    def tensor(self, qtype: int, a: np.ndarray, cols: int) -> int:
        """A 2-D tensor of rows [n, row bytes] (or fp32 values [n, cols]) in `qtype`, cols values per row."""
        t = self.base.ggml_new_tensor_2d(self.ctx, qtype, cols, a.shape[0])
        a = np.ascontiguousarray(a)
        ctypes.memmove(self.base.ggml_get_data(t), a.ctypes.data, a.nbytes)
        return t

    def compute(self, out: int, shape: tuple[int, int]) -> np.ndarray:
        graph = self.base.ggml_new_graph(self.ctx)
        self.base.ggml_build_forward_expand(graph, out)
        assert self.ggml.ggml_graph_compute_with_ctx(self.ctx, graph, 1) == 0
        data = ctypes.cast(self.base.ggml_get_data(out), ctypes.POINTER(ctypes.c_float))
        result = np.ctypeslib.as_array(data, shape).copy()
        self.base.ggml_free(self.ctx)
        return result


def their_mul_mat(ggml, qtype: int, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[T, n]: llama.cpp's matmul op of weight rows w [n, row bytes] in `qtype` with the fp32
    activations x [T, k] (its vec_dot, its tiled K-quant kernel from 8 tokens, its sgemm)."""
    g = GGMLGraph(ggml, w.nbytes + 3 * x.nbytes + w.shape[0] * x.shape[0] * 4)
    a, b = g.tensor(qtype, w, x.shape[1]), g.tensor(0, x.astype(np.float32), x.shape[1])
    return g.compute(g.base.ggml_mul_mat(g.ctx, a, b), (x.shape[0], w.shape[0]))


def their_soft_max(ggml, x: np.ndarray) -> np.ndarray:
    """llama.cpp's soft_max op (its MoE routing probabilities) over the rows of fp32 x [T, n]."""
    g = GGMLGraph(ggml, 3 * x.nbytes)
    return g.compute(g.base.ggml_soft_max(g.ctx, g.tensor(0, x.astype(np.float32), x.shape[1])), x.shape)


def every_token_count_equals(x: np.ndarray, w: np.ndarray, qtype: int, want) -> None:
    """Every build's matmul of the first T activation rows equals `want` to the bit, for every token
    count of a pass and for more than one pass; `want`: [T, n] rows, or a function of T for an op
    whose order depends on its token count."""
    n, k = w.shape[0], x.shape[1]
    for lib in libs():
        for T in list(range(1, MAXT + 2)) + [2 * MAXT + 1]:
            y = matmul_with(lib, torch.from_numpy(x[:T]), w.ctypes.data, qtype, n, k)
            np.testing.assert_array_equal(y.numpy(), want(T) if callable(want) else want[:T], err_msg=f"T={T}")


@pytest.mark.parametrize("n,k", [(5, 64), (24, 1024), (3, 4128)])
def test_q8_0_tokens_equal_llama_cpp_vec_dot(ggml, n, k):
    """Every token count of a pass (and more than one pass) gives llama.cpp's row-by-row dots."""
    rng = np.random.default_rng(n * k)
    w = q_weights(rng, QT.Q8_0, n, k)
    w[0, 2:34] = np.uint8(0x80)  # int8 -128 everywhere in one block: the extreme of every lane sum
    x = (rng.standard_normal((2 * MAXT + 1, k)) * 10.0 ** rng.integers(-2, 2, (2 * MAXT + 1, 1))).astype(np.float32)
    acts = their_q8_0(ggml, x)
    every_token_count_equals(x, w, cpu.Q8_0, their_vec_dots(ggml, "q8_0_q8_0", w, acts, k))


@pytest.mark.parametrize("n,k", [(5, 256), (24, 2048), (2, 16640)])  # 16640: past the stack buffer
def test_q6_k_tokens_equal_llama_cpp(ggml, n, k):
    """Q6_K with several tokens (the VNNI build's token tiles; dot_q6k elsewhere): llama.cpp's
    row-by-row dots for every token count of a pass below 8, its own matmul op (its tiled K-quant
    kernel) from 8, on random bytes (every scale and quant bit)."""
    rng = np.random.default_rng(n + k)
    nb = n * k // 256
    w = rng.integers(0, 256, (nb, 210), dtype=np.uint8)
    w[:, 208:210] = (rng.random(nb) * 2e-2 - 1e-2).astype(np.float16).view(np.uint8).reshape(nb, 2)
    w[0, 192:208] = np.array([127, 128] * 8, np.uint8)  # scales of both extremes (int8 127, -128)
    w = w.reshape(n, -1)
    x = (rng.standard_normal((2 * MAXT + 1, k)) * 10.0 ** rng.integers(-2, 2, (2 * MAXT + 1, 1))).astype(np.float32)
    acts = np.zeros((len(x), k // 256 * 292), np.uint8)
    ggml.quantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    for t in range(len(x)):
        ggml.quantize_row_q8_K(x[t].ctypes.data, acts[t].ctypes.data, k)
    dots = their_vec_dots(ggml, "q6_K_q8_K", w, acts, k)
    every_token_count_equals(x, w, cpu.Q6_K, lambda T: dots[:T] if T < 8 else their_mul_mat(ggml, cpu.Q6_K, w, x[:T]))


@pytest.mark.parametrize("n", [31, 127, 8, 5])
def test_routing_softmax_equals_llama_cpp(ggml, n):
    """The routing softmax (cpu.softmax, its exp as llama.cpp's vectorized one) equals llama.cpp's
    soft_max op to the bit where llama.cpp's build takes emo's SIMD path (else within fp32 ulps): whole vectors and a scalar tail, logits spread so far that exps reach
    the subnormal range and underflow (-200 below the max), and -inf (masked) entries."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((64, n)) * np.array([0.5, 4.0, 40.0, 100.0]).repeat(16)[:, None]).astype(np.float32)
    x[::7, 0] = -np.inf
    ours, theirs = cpu.softmax(torch.from_numpy(x)).numpy(), their_soft_max(ggml, x)
    if llama_takes_our_simd_path():  # its lane sums and exp variant are those of emo's build
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12)
