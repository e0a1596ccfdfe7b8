"""ctypes binding of cpu_kernels.c: quantized matmuls and the routed SwiGLU MoE on the CPU.

The C file (with its headers) is compiled once with gcc (about a second, so a clean clone or CI pays nothing worth
caching elsewhere) into ~/.cache/emo/kernels/<variant>_<hash>.so, keyed by the source, flags and
compiler, for the best instruction set this CPU reports (VARIANTS: AVX2, or AVX-512 with VNNI;
EMO_CPU_KERNELS=avx2 forces the baseline), then loaded with ctypes. ctypes rather than a torch C++ extension: compiling against torch's
headers takes ~a minute on two cores, and the kernels need nothing from torch but raw pointers.

Weights are described by `QWeight` (a raw pointer into a memory-mapped GGUF or a tensor, its
GGML type and shape) and are never copied. Shape legend as in cpu_kernels.c.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
HEADERS = [Path(__file__).with_name(n) for n in ("cpu_dot.h", "cpu_kquants.h", "cpu_tiles.h", "cpu_q4k_rows8.h",
                                                   "cpu_q6k_panels.h", "cpu_pool.h")]
FLAGS = ["-O3", "-pthread", "-fPIC", "-shared",
         # keep mul and add separately rounded, as llama.cpp's graph does for the expert mixture
         "-ffp-contract=off"]
# Instruction sets the library is built for, chosen at run time from what this CPU reports (never
# from the machine that wrote the code). Their matmuls compute the same bits: the AVX-512 VNNI build
# turns each int8 dot product (maddubs + madd) into one vpdpbusd (cpu_dot.h, udot4). The attention's
# fp32 sums follow the lane count of llama.cpp's build for the same instruction set (8 or 16 lanes,
# cpu_kernels.c, vec_dot_f32), as llama.cpp's own results differ between those builds.
VARIANTS = {
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    "avx512vnni": (("avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"),
                   ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl",
                    "-mavx512vnni"]),
}

F32, F16, Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 6, 8, 12, 13, 14, 30  # GGML type ids
# Q4_0 matrices with a multiple of 8 rows: llama.cpp repacks them 8 rows at a time and sums each
# row block after block; the kernels follow that order for them (cpu_kernels.c, dot products)
Q4_0_R = Q4_0 | 0x100
# Q4_K matrices with a multiple of 8 rows, likewise repacked by llama.cpp: 8 rows summed together in
# its gemv order (one token, experts) or gemm order (4-token groups of a 2-D matmul), cpu_q4k_rows8.h
Q4_K_R = Q4_K | 0x100
# flag for an expert that llama.cpp computes as a plain 2-D matmul (the shared expert), which
# changes its F32/F16 summation order for multi-token batches; other matrices need no flag
MATMUL_2D = 0x200
NATIVE_TYPES = {F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q5_0: "Q5_0", Q8_0: "Q8_0",
                Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
BLOCK = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q5_0: (32, 22), Q8_0: (32, 34),
         Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210), Q4_0_R: (32, 18), Q4_K_R: (256, 144)}  # (values, bytes)


class KernelUnavailable(RuntimeError):
    """The CPU kernels cannot be built or run here (no gcc, no AVX2)."""


def cache_dir() -> Path:
    base = os.environ.get("EMO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "emo")
    return Path(base) / "kernels"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo); without it, what torch's own dispatch detected."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        return frozenset(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        cap = torch.backends.cpu.get_cpu_capability()
        return frozenset(VARIANTS["avx2"][0]) if cap in ("AVX2", "AVX512") else frozenset()


def supported_variants(flags: frozenset[str] | None = None) -> list[str]:
    """The library variants this CPU can run, best last."""
    flags = cpu_flags() if flags is None else flags
    return [name for name, (need, _) in VARIANTS.items() if set(need) <= flags]


def chosen_variant() -> str:
    """The best variant this CPU runs and this compiler builds (an older gcc may not know the
    AVX-512 VNNI flags: the next variant down is used), or EMO_CPU_KERNELS (e.g. `avx2`) when set."""
    ok = supported_variants()
    if not ok:
        raise KernelUnavailable("emo's CPU kernels need AVX2, FMA and F16C")
    want = os.environ.get("EMO_CPU_KERNELS")
    if want:
        if want not in ok:
            raise KernelUnavailable(f"EMO_CPU_KERNELS={want}: this CPU runs {', '.join(ok)}")
        return want
    for variant in reversed(ok[1:]):
        try:
            _build(variant)
            return variant
        except KernelUnavailable:
            continue
    return ok[0]


_unbuildable: dict[tuple[str, str], str] = {}  # (compiler, variant) -> why it failed (tried once per process)


def _build(variant: str) -> Path:
    cc = os.environ.get("CC", "gcc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise KernelUnavailable(f"C compiler {cc!r} not found (needed once to build emo's CPU kernels)") from None
    flags = FLAGS + VARIANTS[variant][1]
    text = b"".join(f.read_bytes() for f in (SOURCE, *HEADERS))
    key = hashlib.sha256(text + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    out = cache_dir() / f"emo_cpu_{variant}_{key}.so"
    if out.exists():
        return out
    if (cc, variant) in _unbuildable:
        raise KernelUnavailable(_unbuildable[cc, variant])
    out.parent.mkdir(parents=True, exist_ok=True)
    # compile to a private name and rename: concurrent builders never see a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    r = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        _unbuildable[cc, variant] = f"building emo's CPU kernels failed: {r.stderr.strip().splitlines()[-1:]}"
        raise KernelUnavailable(_unbuildable[cc, variant])
    os.replace(tmp, out)
    return out


@cache
def library(variant: str | None = None) -> ctypes.CDLL:
    """Build (once) and load the kernels, the best variant for this CPU unless `variant` is given;
    raises KernelUnavailable when this CPU cannot run them."""
    variant = variant or chosen_variant()
    if variant not in supported_variants():
        raise KernelUnavailable(f"this CPU cannot run the {variant} kernels")
    lib = ctypes.CDLL(str(_build(variant)))
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.emo_set_threads.argtypes = [ctypes.c_int]
    lib.emo_threads.restype = ctypes.c_int
    lib.emo_row_bytes.argtypes, lib.emo_row_bytes.restype = [ctypes.c_int, i64], ctypes.c_size_t
    lib.emo_matmul.argtypes = [ctypes.c_int, p, p, p, i64, p, i64, p]
    lib.emo_get_rows.argtypes = [p, ctypes.c_int, i64, i64, p, i64, p]
    lib.emo_get_rows.restype = ctypes.c_int
    lib.emo_moe.argtypes = [p, i64, i64, i64, p, p, i64, i64, p, p, p, p, p, p, p, p, p, ctypes.c_int]
    lib.emo_moe.restype = ctypes.c_int
    lib.emo_rms_norm.argtypes = [p, p, i64, i64, ctypes.c_float, p]
    lib.emo_softmax_rows.argtypes = [p, i64, i64]
    lib.emo_attn_decode.argtypes = [p, i64, p, p, ctypes.c_float, p, p, i64, i64, i64, p, p, i64, i64,
                                    ctypes.c_int, ctypes.c_float, p, p, i64, p, p]
    lib.emo_rope_norm.argtypes = [p, i64, i64, i64, p, ctypes.c_float]
    lib.emo_convert_rows.argtypes = [p, i64, i64, ctypes.c_int, p]
    lib.emo_attention.argtypes = [p, i64, i64, i64, i64, p, p, i64, i64, ctypes.c_int, p]
    lib.emo_attention.restype = ctypes.c_int
    return lib


def available() -> bool:
    try:
        library()
        return True
    except KernelUnavailable:
        return False


def set_threads(n: int) -> None:
    library().emo_set_threads(int(n))


def threads() -> int:
    """The kernels' thread count (1 until set_threads)."""
    return int(library().emo_threads())


@dataclass
class QWeight:
    """A weight matrix [N, K] (torch order: out x in) read in place, in GGML type `qtype`."""

    ptr: int
    qtype: int
    n: int
    k: int
    owner: object  # keeps the memory map / tensor alive while the pointer is used

    @classmethod
    def from_array(cls, data: np.ndarray, qtype: int, n: int, k: int, matrix_rows: int | None = None) -> "QWeight":
        """`data`: the tensor's bytes as GGUFReader exposes them (uint8 rows for block types);
        `matrix_rows`: rows of each matrix when `data` stacks several (experts), else n."""
        if qtype not in NATIVE_TYPES:
            raise ValueError(f"GGML type {qtype} is not computed natively")
        vals, nbytes = BLOCK[qtype]
        if k % vals or data.nbytes != n * k // vals * nbytes or not data.flags.c_contiguous:
            raise ValueError(f"weight bytes do not match a [{n}, {k}] {NATIVE_TYPES[qtype]} matrix")
        if qtype in (Q4_0, Q4_K) and (matrix_rows or n) % 8 == 0:
            qtype |= 0x100  # Q4_0_R, Q4_K_R
        return cls(data.ctypes.data, qtype, n, k, data)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "QWeight":
        t = t.detach().contiguous().float()
        return cls(t.data_ptr(), F32, t.shape[0], t.shape[1], t)

    def slice_rows(self, i: int, rows: int) -> "QWeight":
        """Rows [i*rows, (i+1)*rows): one expert of a stacked [E*F, K] tensor."""
        if not (0 <= i and (i + 1) * rows <= self.n):  # the kernels get raw pointers: stay inside the owner
            raise ValueError(f"rows [{i * rows}, {(i + 1) * rows}) outside a matrix of {self.n} rows")
        vals, nbytes = BLOCK[self.qtype]
        stride = self.k // vals * nbytes
        return QWeight(self.ptr + i * rows * stride, self.qtype, rows, self.k, self.owner)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class MatmulPlan:
    """Matrices sharing one input, with their ctypes arguments built once (decode calls it per token)."""

    def __init__(self, weights: list[QWeight]):
        self.m, self.k = len(weights), weights[0].k
        assert all(w.k == self.k for w in weights), [w.k for w in weights]
        self.n = [w.n for w in weights]
        self.ws = (ctypes.c_void_p * self.m)(*[w.ptr for w in weights])
        self.tys = (ctypes.c_int * self.m)(*[w.qtype for w in weights])
        self.ns = (ctypes.c_int64 * self.m)(*self.n)
        self.owners = [w.owner for w in weights]

    def __call__(self, x: torch.Tensor, outs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """x [T, K] fp32 -> [x @ W.T]; `outs` (optional) are contiguous fp32 [T, n] buffers to fill."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.contiguous().float()
        T = x.shape[0]
        assert x.shape[1] == self.k, (x.shape, self.k)
        ys = outs if outs is not None else [torch.empty(T, n, dtype=torch.float32) for n in self.n]
        yp = (ctypes.c_void_p * self.m)(*[y.data_ptr() for y in ys])
        library().emo_matmul(self.m, self.ws, self.tys, self.ns, self.k, x.data_ptr(), T, yp)
        return ys


def matmul(x: torch.Tensor, weights: list[QWeight]) -> list[torch.Tensor]:
    """x [T, K] fp32 -> [x @ W.T for W in weights]; matrices sharing an input run in one pass."""
    return MatmulPlan(weights)(x)


def rope_norm_(x: torch.Tensor, positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """In place: NORM RoPE (pairs 2i, 2i+1) on x [T, H*hd] fp32 contiguous for positions [T],
    with llama.cpp's fp32 angle recurrence, libm cosf/sinf and fused multiply-adds."""
    assert x.dtype == torch.float32 and x.is_contiguous() and x.shape[1] % head_dim == 0
    pos = positions.contiguous().to(torch.int64)
    library().emo_rope_norm(_ptr(x), x.shape[0], x.shape[1] // head_dim, head_dim, _ptr(pos), base)
    return x


def get_rows(w: QWeight, ids: torch.Tensor) -> torch.Tensor:
    """Dequantize rows `ids` [T] of `w` -> [T, K] fp32 (the embedding lookup)."""
    ids = ids.reshape(-1).contiguous().to(torch.int64)
    out = torch.empty(ids.numel(), w.k, dtype=torch.float32)
    if library().emo_get_rows(w.ptr, w.qtype, w.n, w.k, _ptr(ids), ids.numel(), _ptr(out)):
        raise IndexError(f"token id out of range for {w.n} rows")
    return out


class Expert(ctypes.Structure):
    """One expert's weights for the C side (struct emo_expert): a decode step's shared expert."""

    _fields_ = [("gate", ctypes.c_void_p), ("up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("gtype", ctypes.c_int), ("utype", ctypes.c_int), ("dtype", ctypes.c_int),
                ("F", ctypes.c_int64), ("E", ctypes.c_int64)]


class MoEWeights:
    """One layer's experts as per-expert pointer tables: gate/up [F, D], down [D, F] each."""

    def __init__(self, gate: list[QWeight], up: list[QWeight], down: list[QWeight]):
        E = len(gate)
        self.E, self.F, self.D = E, gate[0].n, gate[0].k
        for g, u, d in zip(gate, up, down):
            assert (g.n, g.k, u.n, u.k, d.n, d.k) == (self.F, self.D, self.F, self.D, self.D, self.F)
        ptrs = ctypes.c_void_p * E
        ints = ctypes.c_int * E
        self.gate, self.up, self.down = (ptrs(*[w.ptr for w in ws]) for ws in (gate, up, down))
        self.gtype, self.utype, self.dtype = (ints(*[w.qtype for w in ws]) for ws in (gate, up, down))
        self.owners = [w.owner for w in gate + up + down]

    def expert(self, e: int) -> Expert:
        return Expert(self.gate[e], self.up[e], self.down[e], self.gtype[e], self.utype[e], self.dtype[e],
                      self.F, self.E)


def moe(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, layer: MoEWeights,
        return_norms: bool = False, residual: torch.Tensor | None = None):
    """x [T, D] fp32, experts/weights [T, S] -> y [T, D] (and ||expert output|| per slot [T, S]);
    with `residual` [T, D], y = residual + mixture (added last, as llama.cpp's graph does)."""
    x = x.contiguous().float()
    T, D = x.shape
    S = experts.shape[1]
    ex = experts.contiguous().to(torch.int64)
    wt = weights.contiguous().float()
    y = torch.empty(T, D, dtype=torch.float32)
    norms = torch.empty(T, S, dtype=torch.float32) if return_norms else None
    res = None
    if residual is not None:
        res = residual.contiguous().float()
        assert res.shape == (T, D)
    if library().emo_moe(_ptr(x), T, D, layer.F, _ptr(ex), _ptr(wt), S, layer.E, layer.gate, layer.up,
                         layer.down, layer.gtype, layer.utype, layer.dtype, _ptr(y),
                         _ptr(norms) if norms is not None else None, _ptr(res) if res is not None else None, 0):
        raise IndexError(f"expert id out of range for {layer.E} experts")
    return (y, norms) if return_norms else y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] fp32 -> RMSNorm(x) * weight with ggml's arithmetic (squares summed in double)."""
    x = x.contiguous().float()
    D = x.shape[-1]
    w = weight.contiguous().float()
    out = torch.empty_like(x)
    library().emo_rms_norm(_ptr(x), _ptr(w), x.numel() // D, D, eps, _ptr(out))
    return out


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of fp32 x [T, n], as llama.cpp computes its MoE routing
    probabilities (its vectorized exp, sums in double): routing fed from these kernels' logits then
    picks and weighs experts exactly as llama.cpp does. -inf entries get probability 0."""
    out = x.float().contiguous().clone()
    library().emo_softmax_rows(_ptr(out), out.numel() // max(out.shape[-1], 1), out.shape[-1])
    return out


class AttentionWeights:
    """A layer's attention block for `LayerDecoder`: norms [D], q, k, v, o weights, and optionally the
    MoE router [E_r, D] (F32), whose logits the same call then returns."""

    def __init__(self, attn_norm: torch.Tensor, ffn_norm: torch.Tensor, q: QWeight, k: QWeight,
                 v: QWeight, o: QWeight, heads: int, kv_heads: int, head_dim: int, eps: float, rope_base: float,
                 router: QWeight | None = None):
        self.attn_norm, self.ffn_norm = attn_norm.contiguous().float(), ffn_norm.contiguous().float()
        self.w = (ctypes.c_void_p * 4)(*[m.ptr for m in (q, k, v, o)])
        self.types = (ctypes.c_int * 4)(*[m.qtype for m in (q, k, v, o)])
        self.owners = [q.owner, k.owner, v.owner, o.owner]
        self.D, self.H, self.Hkv, self.hd = q.k, heads, kv_heads, head_dim
        self.eps, self.rope_base = eps, rope_base
        assert router is None or (router.qtype == F32 and router.k == q.k)
        self.router = router


KV_TYPES = {torch.float32: F32, torch.float16: F16}  # cache dtypes the attention reads, as GGML types


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention in llama.cpp's order for the batch size and cache type: q [T, H, hd] fp32
    at positions start..start+T-1, caches [Hkv, cap, hd] (fp32 or fp16, contiguous) holding
    positions 0..start+T-1 -> o [T, H, hd]."""
    T, H, hd = q.shape
    assert q.is_contiguous() and q.dtype == torch.float32 and k_cache.dtype == v_cache.dtype
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[1] >= start + T
    out = torch.empty(T, H, hd, dtype=torch.float32)
    if library().emo_attention(_ptr(q), T, H, k_cache.shape[0], hd, _ptr(k_cache), _ptr(v_cache), k_cache.shape[1],
                               start, KV_TYPES.get(k_cache.dtype, -1), _ptr(out)):
        raise ValueError(f"KV cache of {k_cache.dtype}: the kernels read float32 or float16")
    return out


class LayerDecoder:
    """One layer's decode step for a single sequence, on fixed buffers, with its ctypes arguments
    built once (a small model decodes at the speed of its per-call overhead): `attention` is the
    attention block plus the router logits in one C call, `mixture` adds the routed experts to h in
    place. h and x_ffn [1, D] are shared by the model's layers; logits [1, >= E_r] is the layer's
    (its shared-expert columns stay 0). With `shared`, the last expert is a shared one (routing
    always picks it): `attention` starts it in the background, and `mixture` takes its output."""

    def __init__(self, a: AttentionWeights, experts: MoEWeights | None, h: torch.Tensor, x_ffn: torch.Tensor,
                 logits: torch.Tensor | None, shared: bool = False):
        for t in (h, x_ffn) + ((logits,) if logits is not None else ()):
            assert t.is_contiguous() and t.dtype == torch.float32 and t.shape[0] == 1
        assert h.shape[1] == x_ffn.shape[1] == a.D
        r = a.router
        assert (r is None) == (logits is None) and (r is None or logits.shape[1] >= r.n)
        lib = library()
        self.h, self.x_ffn, self.logits = h, x_ffn, logits
        self.keep = (a, experts)  # the pointers below point into these and the buffers
        self._attn = lib.emo_attn_decode
        self._attn_head = (_ptr(h), a.D, _ptr(a.attn_norm), _ptr(a.ffn_norm), a.eps, a.w, a.types, a.H, a.Hkv, a.hd)
        self._shared = experts.expert(experts.E - 1) if shared and experts is not None else None
        self._attn_tail = (a.rope_base, _ptr(x_ffn), r.ptr if r else None, r.n if r else 0,
                           _ptr(logits) if r else None,
                           ctypes.byref(self._shared) if self._shared is not None else None)
        if experts is not None:
            self._moe, self.num_experts = lib.emo_moe, experts.E
            self._moe_head = (_ptr(x_ffn), 1, a.D, experts.F)
            # y and residual are both h: the mixture is added to the stream in place (the kernel
            # reads each residual value before writing it)
            self._moe_tail = (experts.E, experts.gate, experts.up, experts.down, experts.gtype, experts.utype,
                              experts.dtype, _ptr(h), None, _ptr(h), int(self._shared is not None))

    def attention(self, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> None:
        """h += attention block at position `pos`; the new key/value go to the caches [1, Hkv, cap, hd]
        (fp32 or fp16); x_ffn = RMSNorm(h) * ffn_norm; logits = router @ x_ffn."""
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2] > pos
        assert k_cache.dtype == v_cache.dtype and k_cache.dtype in KV_TYPES
        self._attn(*self._attn_head, _ptr(k_cache), _ptr(v_cache), k_cache.shape[2], pos, KV_TYPES[k_cache.dtype],
                   *self._attn_tail)

    def mixture(self, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """h += sum_s weights[0, s] * expert_{experts[0, s]}(x_ffn); experts int64, weights fp32 [1, S]."""
        assert experts.dtype == torch.int64 and weights.dtype == torch.float32
        assert experts.is_contiguous() and weights.is_contiguous() and experts.shape == weights.shape
        if self._moe(*self._moe_head, _ptr(experts), _ptr(weights), experts.shape[1], *self._moe_tail):
            raise IndexError(f"expert id out of range for {self.num_experts} experts")
