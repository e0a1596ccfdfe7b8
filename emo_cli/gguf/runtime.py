"""Run an emo GGUF export (llama.cpp's `deepseek` layout, see gguf/layout.py) with emo's kernels.

The file is memory-mapped (emo_cli.gguf.reader: opening parses only the header and tables). On the
`cpu` backend, F32/F16/BF16/Q8_0/Q4_0/Q5_0/Q4_K/Q5_K/Q6_K weights are handed to the C kernels as
pointers into the map and never copied; the rarer Q4_1/Q5_1/Q2_K/Q3_K are dequantized to fp32
tensor by tensor at load.
The `torch`/`triton` backends dequantize everything (dense stacked experts for grouped_moe / triton_moe).

The model mirrors llama.cpp's graph so greedy decoding agrees with it: q/k stay in the file's
permuted row order and get NORM RoPE (pairs 2i, 2i+1; llama.cpp's angles, accumulated in fp32),
which equals EMO's NeoX RoPE on unpermuted rows (the attention scores are the same dot products);
RMSNorm sums squares in float64 as ggml does; the quantized matmuls quantize activations to
Q8_0 (inside the kernels). The shared expert is re-attached as the last expert with a zero router
row: in its own one-way softmax it gets weight exactly 1.0, as EMO's legacy-shared routing says.

Decoding one token of one sequence on the CPU kernels takes a fast path: per layer one C call for
the attention block and the router logits and one for the experts (cpu.LayerDecoder), with
emo_cli.arch.routing.route between them. Everything else (prefill, batches, observers) goes through
the general path below. Both follow llama.cpp's order, which differs between a one-token step and
a batch (its sgemm and tiled kernels), so a position decoded alone and the same position in a
prefill agree within the activations' rounding, as in llama.cpp.

The KV cache is fp16 on the CPU kernels, llama.cpp's default cache type (`kv_dtype`; float32 for
a bit-for-bit comparison with an fp32 reference or with llama.cpp run on an F32 cache); keys and
values are rounded to it before any attention reads them, as llama.cpp stores them first.

Shape legend: B batch, S sequence, T = B*S, D hidden, H/Hkv heads, hd head dim, E experts (shared
last), F expert width, V vocab.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F_
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from emo_cli.arch.emo import EmoConfig
from emo_cli.arch.layers import DEFAULT_ACTIVATION_BUDGET, KVCache, MoEObservation, Observer, causal_attention
from emo_cli.arch.routing import RoutingSpec, route
from emo_cli.errors import EmoError
from emo_cli.gguf import layout as gf
from emo_cli.gguf.quants import READABLE_TYPES
from emo_cli.gguf.reader import GGUFFile
from emo_cli.gguf.vocab import tokenizer_from_gguf
from emo_cli.model.api import LoadedModel, expert_mask
from emo_kernels import cpu
from emo_kernels.dispatch import BackendError, moe_function, resolve
from emo_kernels.grouped import grouped_moe


# ---- tensors ---------------------------------------------------------------------------------------
def _dense(t, device: str) -> torch.Tensor:
    """A tensor in numpy order as fp32 on `device`; an F32 tensor on the CPU is not copied."""
    if t.tensor_type == QT.F32:
        arr = t.data
    else:
        arr = dequantize(t.data, t.tensor_type)
    with warnings.catch_warnings():  # the map is read-only and never written through
        warnings.simplefilter("ignore", UserWarning)
        out = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    return out.to(device) if device != "cpu" else out


def _qweight(t, rows: int, cols: int) -> cpu.QWeight:
    """A [rows, cols] matrix (or a stack of them, rows = E*F) for the C kernels, in place if native."""
    if int(t.tensor_type) in cpu.NATIVE_TYPES:
        matrix_rows = int(t.shape[1])  # GGUF ne order: {cols, rows of one matrix, experts}
        return cpu.QWeight.from_array(t.data.reshape(rows, -1), int(t.tensor_type), rows, cols, matrix_rows)
    return cpu.QWeight.from_tensor(_dense(t, "cpu").reshape(rows, cols))


class Mat:
    """One weight matrix [N, K] on the model's backend: x [T, K] -> [T, N]."""

    def __init__(self, t, backend: str, device: str):
        self.k = int(t.shape[0])  # GGUF ne order: {K, N}
        self.n = int(np.prod([int(s) for s in t.shape[1:]]))
        if backend == "cpu":
            self.w = _qweight(t, self.n, self.k)
        else:
            self.w = _dense(t, device).reshape(self.n, self.k)


def matmul(backend: str, x: torch.Tensor, mats: list[Mat]) -> list[torch.Tensor]:
    """x [T, K] through every matrix (one pass over the activation on the CPU kernels)."""
    if backend == "cpu":
        return cpu.matmul(x, [m.w for m in mats])
    return [x @ m.w.t() for m in mats]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ggml's RMSNorm: fp32 squares summed in float64, scale 1/sqrt(mean + eps) in fp32, then * weight."""
    ms = (x * x).double().mean(-1, keepdim=True).float()
    # sqrt and division in float64, each rounded to fp32: exactly ggml's 1.0f/sqrtf (torch's fp32
    # sqrt is not always correctly rounded, and one ulp here can flip an activation quantization)
    root = torch.sqrt((ms + eps).double()).float()  # sqrtf
    scale = (1.0 / root.double()).float()  # 1.0f / root
    return (x * scale) * weight


def rope_tables(start: int, S: int, hd: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, hd/2] with llama.cpp's angles: pos * scale^i accumulated in fp32."""
    scale = np.float32(theta) ** np.float32(-2.0 / hd)
    pos = np.arange(start, start + S, dtype=np.float32)[:, None]
    steps = np.full((S, hd // 2 - 1), scale, dtype=np.float32)
    ang = np.multiply.accumulate(np.concatenate([pos, steps], 1), axis=1, dtype=np.float32)  # [S, hd/2]
    ang_t = torch.from_numpy(ang)
    return ang_t.cos().to(device), ang_t.sin().to(device)


def rope_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., hd]: rotate interleaved pairs (2i, 2i+1) — llama.cpp's NORM mode."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def make_rope(backend: str, B: int, S: int, start: int, cfg: EmoConfig, device):
    """x [B*S, heads*hd] -> rotated, for positions start..start+S-1 of every sequence."""
    hd = cfg.head_dim
    if backend == "cpu":  # in C, with llama.cpp's exact arithmetic
        pos = torch.arange(start, start + S).repeat(B)
        return lambda x: cpu.rope_norm_(x.contiguous(), pos, hd, cfg.rope_theta)
    cos, sin = rope_tables(start, S, hd, cfg.rope_theta, device)  # [S, hd/2]
    return lambda x: rope_norm(x.view(B, S, -1, hd), cos[:, None], sin[:, None]).reshape(B * S, -1)


# ---- layers ----------------------------------------------------------------------------------------
class GGUFMoE:
    """One MoE layer: router [E, D] (shared expert's row = 0) and the experts on the backend."""

    def __init__(self, T: dict, i: int, cfg: EmoConfig, backend: str, device: str, expert_ids):
        E, ns = cfg.layer_experts(i), cfg.layer_shared(i)
        self.layer, self.backend = i, backend
        self.spec = RoutingSpec(num_experts=E, top_k=min(cfg.num_experts_per_tok, E), num_shared=ns)
        router = _dense(T[gf.blk(i, gf.FFN_GATE_INP)], device)  # [E_r, D]
        # torch's router [E, D] (zero rows for the shared experts); the CPU kernels read the file's
        self.router = None if backend == "cpu" else torch.cat([router, router.new_zeros(ns, router.shape[1])]) \
            if ns else router
        # on the CPU kernels the routed logits get ggml's fp32 summation order (routing ties matter)
        self.router_w = cpu.QWeight.from_tensor(router) if backend == "cpu" else None
        self.router_q = cpu.MatmulPlan([self.router_w]) if backend == "cpu" else None
        # ... and llama.cpp's softmax, so that routing weights match to the bit as well
        self.softmax = cpu.softmax if backend == "cpu" else None
        self.expert_ids = torch.as_tensor(expert_ids if expert_ids is not None else range(E))
        self.allowed: torch.Tensor | None = None
        names = (gf.FFN_GATE_EXPS, gf.FFN_UP_EXPS, gf.FFN_DOWN_EXPS)
        shexp = (gf.FFN_GATE_SHEXP, gf.FFN_UP_SHEXP, gf.FFN_DOWN_SHEXP)
        Er, Fw, D = E - ns, cfg.intermediate_size, cfg.hidden_size
        if backend == "cpu":
            per = []
            for name, sh, (r, c) in zip(names, shexp, ((Fw, D), (Fw, D), (D, Fw))):
                stack = _qweight(T[gf.blk(i, name)], Er * r, c)
                ws = [stack.slice_rows(e, r) for e in range(Er)]
                if ns:  # llama.cpp runs the shared expert as its own 2-D matmul
                    q = _qweight(T[gf.blk(i, sh)], r, c)
                    ws.append(dataclasses.replace(q, qtype=q.qtype | cpu.MATMUL_2D))
                per.append(ws)
            self.cpu_weights = cpu.MoEWeights(*per)
        else:
            self.moe_fn = moe_function(backend)
            stacks = []
            for name, sh, (r, c) in zip(names, shexp, ((Fw, D), (Fw, D), (D, Fw))):
                w = _dense(T[gf.blk(i, name)], device).reshape(Er, r, c)
                stacks.append(torch.cat([w, _dense(T[gf.blk(i, sh)], device).reshape(1, r, c)]) if ns else w)
            self.w_gate, self.w_up, self.w_down = stacks

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] of x [T, D]; the shared experts' columns are 0."""
        if self.router_q is not None:
            T, ns = x.shape[0], self.spec.num_shared
            if T == 1 or not ns:  # the routed logits land in the first E_r columns; shared ones stay 0
                logits = torch.zeros(T, self.spec.num_experts)
                self.router_q(x, outs=[logits])
            else:
                (logits,) = self.router_q(x)  # [T, E_r]
                logits = torch.cat([logits, logits.new_zeros(T, ns)], 1)  # [T, E]
        else:
            logits = x @ self.router.t()  # [T, E]
        return logits

    def __call__(self, x: torch.Tensor, observer: Observer | None = None, residual: torch.Tensor | None = None,
                 allowed: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D] -> mixture [T, D]; `residual` (CPU kernels) is added to it inside the kernel;
        `allowed` ([E] or [T, E] bool) masks routing for this call, else the switched subset;
        `logits` [T, E]: the router logits of x when already computed (the decode step's C call)."""
        logits = self.logits(x) if logits is None else logits
        r = route(logits, self.spec, self.allowed if allowed is None else allowed, self.softmax)
        norms = None
        if self.backend == "cpu":
            res = cpu.moe(x, r.experts, r.weights, self.cpu_weights, return_norms=observer is not None,
                          residual=residual)
            out, norms = res if observer is not None else (res, None)
        elif observer is not None:  # profiling needs the per-slot expert output norms
            out, norms = grouped_moe(x, r.experts, r.weights, self.w_gate, self.w_up, self.w_down, return_norms=True)
        else:
            out = self.moe_fn(x, r.experts, r.weights, self.w_gate, self.w_up, self.w_down)
        if self.backend != "cpu" and residual is not None:  # the CPU kernel added it already
            out = residual + out
        if observer is not None:
            observer(MoEObservation(self.layer, x, logits, r, out, norms))
        return out


def reserve_cache(cache: KVCache, layer: int, need: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """The layer's key/value buffers [1, Hkv, cap, hd] with cap >= need, grown like KVCache.update
    (doubling, cached positions kept), so the C decode and the torch prefill share one cache; a
    cache keeps the dtype it was started with."""
    buf = cache.k[layer]
    if buf is None or buf.shape[2] < need or buf.shape[0] != 1:
        cap = max(need, 2 * (buf.shape[2] if buf is not None else 64))
        dtype = buf.dtype if buf is not None else dtype
        k = torch.empty(1, kv_heads, cap, head_dim, dtype=dtype)
        v = torch.empty(1, kv_heads, cap, head_dim, dtype=dtype)
        if buf is not None and buf.shape[0] == 1:
            n = min(cache.length, buf.shape[2])
            k[:, :, :n] = buf[:, :, :n]
            v[:, :, :n] = cache.v[layer][:, :, :n]
        cache.k[layer], cache.v[layer] = k, v
    return cache.k[layer], cache.v[layer]


class GGUFBlock:
    def __init__(self, T: dict, i: int, cfg: EmoConfig, backend: str, device: str, expert_ids):
        self.i, self.backend, self.cfg = i, backend, cfg
        self.kv_dtype = torch.float32  # the model sets its own (GGUFModel.kv_dtype)

        def mat(name):
            return Mat(T[gf.blk(i, name)], backend, device)

        self.attn_norm = _dense(T[gf.blk(i, gf.ATTN_NORM)], device)
        self.ffn_norm = _dense(T[gf.blk(i, gf.FFN_NORM)], device)
        self.wq, self.wk, self.wv, self.wo = (mat(n) for n in (gf.ATTN_Q, gf.ATTN_K, gf.ATTN_V, gf.ATTN_OUT))
        if cfg.layer_experts(i):
            self.moe = GGUFMoE(T, i, cfg, backend, device, expert_ids)
        else:
            self.moe = None
            self.dense = [mat(n) for n in (gf.FFN_GATE, gf.FFN_UP, gf.FFN_DOWN)]
        self.attn_c, self.decoder = None, None
        if backend == "cpu":
            self.attn_c = cpu.AttentionWeights(self.attn_norm, self.ffn_norm, self.wq.w, self.wk.w, self.wv.w,
                                               self.wo.w, cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim,
                                               cfg.rms_norm_eps, cfg.rope_theta,
                                               self.moe.router_w if self.moe is not None else None)

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.backend == "cpu":
            return cpu.rms_norm(x, w, self.cfg.rms_norm_eps)
        return rms_norm(x, w, self.cfg.rms_norm_eps)

    def attention(self, x, rope, cache: KVCache | None, start: int) -> torch.Tensor:
        cfg = self.cfg
        B, S, D = x.shape
        H, Hkv, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        q, k, v = matmul(self.backend, x.reshape(B * S, D), [self.wq, self.wk, self.wv])
        if self.backend == "cpu" and hd % 8 == 0:
            o = self.attention_c(rope(q).view(B, S, H, hd), rope(k), v, cache, start)
            (out,) = matmul(self.backend, o.reshape(B * S, H * hd), [self.wo])
            return out.view(B, S, D)
        q = rope(q).view(B, S, H, hd).transpose(1, 2)  # [B, H, S, hd]
        k = rope(k).view(B, S, Hkv, hd).transpose(1, 2)  # [B, Hkv, S, hd]
        v = v.view(B, S, Hkv, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.i, k, v, start)
        o = causal_attention(q, k, v, start)  # [B, H, S, hd]
        (out,) = matmul(self.backend, o.transpose(1, 2).reshape(B * S, H * hd), [self.wo])
        return out.view(B, S, D)

    def attention_c(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None,
                    start: int) -> torch.Tensor:
        """Attention on the CPU kernels, in llama.cpp's order for a batch of S queries: q [B, S, H, hd],
        k/v [B*S, Hkv*hd] (roped k) -> o [B, S, H, hd]. k and v are rounded to the cache type first,
        cache or not, as llama.cpp reads them back from its cache."""
        B, S, H, hd = q.shape
        Hkv = self.cfg.kv_heads
        k = k.view(B, S, Hkv, hd).transpose(1, 2).to(self.kv_dtype)  # [B, Hkv, S, hd]
        v = v.view(B, S, Hkv, hd).transpose(1, 2).to(self.kv_dtype)
        if cache is not None:
            k, v = cache.update(self.i, k, v, start)  # positions 0..start+S-1
        k, v = k.contiguous(), v.contiguous()
        return torch.stack([cpu.attention(q[b].contiguous(), k[b], v[b], start) for b in range(B)])

    def __call__(self, h, rope, cache, start, observer=None, allowed=None):
        h = h + self.attention(self.norm(h, self.attn_norm), rope, cache, start)
        B, S, D = h.shape
        x = self.norm(h, self.ffn_norm).reshape(B * S, D)
        return self.ffn(h.reshape(B * S, D), x, observer, allowed).view(B, S, D)

    def router_probs(self, h, rope) -> torch.Tensor:
        """Unmasked routing probabilities [T, E] for the layer input h [B, S, D]."""
        h = h + self.attention(self.norm(h, self.attn_norm), rope, None, 0)
        x = self.norm(h, self.ffn_norm).reshape(-1, h.shape[-1])
        return route(self.moe.logits(x), self.moe.spec, softmax=self.moe.softmax).probs

    def ffn(self, h: torch.Tensor, x: torch.Tensor, observer=None, allowed=None, logits=None) -> torch.Tensor:
        """h + FFN(x) for h, x [T, D] (x = the normed h); `logits`: the router's, when already known."""
        if self.moe is not None:
            return self.moe(x, observer, residual=h, allowed=allowed, logits=logits)
        g, u = matmul(self.backend, x, self.dense[:2])
        (y,) = matmul(self.backend, F_.silu(g) * u, self.dense[2:])
        return h + y

    def bind_decoder(self, stream: torch.Tensor, x_ffn: torch.Tensor) -> None:
        """Build this layer's C decode step over the model's residual stream and FFN input [1, D]."""
        logits = torch.zeros(1, self.moe.spec.num_experts) if self.moe is not None else None
        self.decoder = cpu.LayerDecoder(self.attn_c, self.moe.cpu_weights if self.moe is not None else None,
                                        stream, x_ffn, logits,
                                        shared=self.moe is not None and self.moe.spec.num_shared > 0)

    def decode_step(self, cache: KVCache, pos: int) -> None:
        """One token of one sequence on the CPU kernels, in place on the bound stream h [1, D]: the
        attention block and the router logits are one C call, routing is emo_cli.arch.routing.route,
        the experts one more C call."""
        cfg, dec = self.cfg, self.decoder
        k, v = reserve_cache(cache, self.i, pos + 1, cfg.kv_heads, cfg.head_dim, self.kv_dtype)
        dec.attention(k, v, pos)
        if self.moe is None:
            dec.h.copy_(self.ffn(dec.h, dec.x_ffn))
            return
        r = route(dec.logits, self.moe.spec, self.moe.allowed, self.moe.softmax)
        dec.mixture(r.experts, r.weights)


@contextmanager
def kernel_threads_only(backend: str):
    """On the CPU kernels, torch itself runs on one thread: it only routes and copies there, and
    an OpenMP thread of its own spins after each parallel region, taking a core from the kernels'
    pool (which then waits on it) on a machine with as many cores as threads."""
    n = torch.get_num_threads()
    if backend != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def populate_in_background(data: np.ndarray) -> threading.Thread:
    """`populate` on a daemon thread: loading returns at once and the first token is not paid for
    reading the whole file; pages not read yet fault in on first use (ctypes releases the GIL
    during madvise, so the prefetch runs beside the first forward)."""
    t = threading.Thread(target=populate, args=(data,), name="emo-gguf-prefetch", daemon=True)
    t.start()
    return t


def populate(data: np.ndarray) -> None:
    """Map every page of the memory-mapped file (Linux MADV_POPULATE_READ; llama.cpp does the
    same with MAP_POPULATE) when it fits comfortably in free memory: decode then never stops on a
    page fault the first time it meets an expert, and the pages stay evictable file cache."""
    try:
        avail = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                     if ln.startswith("MemAvailable:"))
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, StopIteration, ValueError):
        return
    if data.nbytes > avail // 2:
        return
    addr, size = data.ctypes.data, data.nbytes
    base = addr - addr % 4096
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(base, size + (addr - base), 22) != 0:  # MADV_POPULATE_READ (Linux >= 5.14)
        libc.madvise(base, size + (addr - base), 3)  # MADV_WILLNEED: at least read ahead


class GGUFModel:
    """The model interface (model/api.py) over a GGUF file, plus whole-model conveniences
    (hidden_states, forward, new_cache, set_expert_mask) for chat."""

    def __init__(self, reader: GGUFFile, backend: str, device: str):
        self.reader = reader
        path = reader.path
        self.config = cfg = gf.config_from_gguf(self.reader, path)
        if backend == "cpu":  # the kernels read the map itself
            self.prefetch = populate_in_background(self.reader.data)
        self.backend = backend
        self._device = torch.device(device)
        self.activation_budget = DEFAULT_ACTIVATION_BUDGET
        T = {t.name: t for t in self.reader.tensors}
        self._check_tensors(T, path)
        kept = gf.provenance(self.reader).get("experts_kept_per_layer")
        self.layers = [GGUFBlock(T, i, cfg, backend, device, kept[i] if kept else None)
                       for i in range(cfg.num_hidden_layers)]
        self.norm = _dense(T[gf.OUTPUT_NORM], device)
        embd = T[gf.TOKEN_EMBD]
        self.embed_matrix = Mat(embd, backend, device)
        self.lm_head = Mat(T[gf.OUTPUT], backend, device) if gf.OUTPUT in T else self.embed_matrix
        self.lm_plan = cpu.MatmulPlan([self.lm_head.w]) if backend == "cpu" else None
        self._stream: torch.Tensor | None = None  # the C decode steps' residual stream
        self.kv_dtype = torch.float16 if backend == "cpu" else torch.float32

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's type: fp16 on the CPU kernels (llama.cpp's default), else float32; a cache
        keeps the type it was started with."""
        return self._kv_dtype

    @kv_dtype.setter
    def kv_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in (torch.float16, torch.float32) or (dtype != torch.float32 and self.backend != "cpu"):
            raise EmoError(f"a KV cache of {dtype} on the {self.backend} backend: the CPU kernels keep "
                           "float16 or float32, the others float32")
        self._kv_dtype = dtype
        for b in self.layers:
            b.kv_dtype = dtype

    def _check_tensors(self, T: dict, path: Path) -> None:
        """Every tensor the config implies is there with its shape and a type emo computes, so a
        damaged or hand-made file fails here in one line, never inside a matmul or a kernel."""
        cfg = self.config
        D, V, F = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        need = {gf.TOKEN_EMBD: (V, D), gf.OUTPUT_NORM: (D,)}  # numpy order
        size = int(self.reader.data.nbytes)
        if gf.OUTPUT in T:
            need[gf.OUTPUT] = (V, D)
        for i in range(cfg.num_hidden_layers):
            shapes = {gf.ATTN_NORM: (D,), gf.FFN_NORM: (D,), gf.ATTN_Q: (q, D), gf.ATTN_K: (kv, D),
                      gf.ATTN_V: (kv, D), gf.ATTN_OUT: (D, q)}
            E = cfg.layer_experts(i)
            if E:
                Er = E - cfg.layer_shared(i)
                shapes.update({gf.FFN_GATE_INP: (Er, D), gf.FFN_GATE_EXPS: (Er, F, D), gf.FFN_UP_EXPS: (Er, F, D),
                               gf.FFN_DOWN_EXPS: (Er, D, F), gf.FFN_GATE_SHEXP: (F, D), gf.FFN_UP_SHEXP: (F, D),
                               gf.FFN_DOWN_SHEXP: (D, F)})
            else:
                Fd = cfg.dense_intermediate_size
                shapes.update({gf.FFN_GATE: (Fd, D), gf.FFN_UP: (Fd, D), gf.FFN_DOWN: (D, Fd)})
            need.update({gf.blk(i, n): s for n, s in shapes.items()})
        for name, shape in need.items():
            if name not in T:
                raise EmoError(f"{path}: GGUF lacks tensor {name} (not a complete emo export)")
            have = tuple(int(d) for d in reversed(T[name].shape))  # GGUF ne order is numpy's reversed
            if have != shape:
                raise EmoError(f"{path}: tensor {name} has shape {have}, but the file's keys imply {shape}")
            if T[name].tensor_type not in READABLE_TYPES:
                raise EmoError(f"{path}: tensor {name} has type {T[name].tensor_type.name}, which emo cannot compute")
            # the kernels get raw pointers into the map: every byte they may read must be in the file
            t = T[name]
            if int(t.data_offset) + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
                raise EmoError(f"{path}: tensor {name} lies outside the file (truncated download?)")
        kept = gf.provenance(self.reader).get("experts_kept_per_layer")
        if kept is not None and not (
                isinstance(kept, list) and len(kept) == cfg.num_hidden_layers
                and all((k is None and not cfg.layer_experts(i)) or (
                    isinstance(k, list) and len(k) == cfg.layer_experts(i)
                    and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in k))
                        for i, k in enumerate(kept))):
            raise EmoError(f"{path}: emo.experts_kept_per_layer does not match the file's layers")

    # ---- the model interface ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def expert_ids(self) -> list[list[int] | None]:
        return [b.moe.expert_ids.tolist() if b.moe is not None else None for b in self.layers]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        B, S = ids.shape
        if self.backend == "cpu":
            return cpu.get_rows(self.embed_matrix.w, ids.cpu()).view(B, S, -1)
        return F_.embedding(ids.to(self._device), self.embed_matrix.w)

    def run_layers(self, h: torch.Tensor, start: int, stop: int, masks: dict | None = None,
                   observer: Observer | None = None, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = h.shape
        pos = cache.length if cache is not None else 0
        fast = (self.backend == "cpu" and B == 1 and S == 1 and cache is not None and observer is None
                and not masks and self.config.head_dim % 8 == 0)
        # inference_mode: half the per-op cost of no_grad (decode is op-bound)
        with torch.inference_mode(), kernel_threads_only(self.backend):
            if fast:  # decode: one C call per attention block, one per MoE
                stream = self._decode_stream()
                stream.copy_(h.reshape(1, -1))
                for i in range(start, stop):
                    self.layers[i].decode_step(cache, pos)
                h = stream.clone().view(1, 1, -1)
            else:
                rope = make_rope(self.backend, B, S, pos, self.config, self._device)
                for i in range(start, stop):
                    h = self.layers[i](h, rope, cache, pos, observer, masks.get(i) if masks else None)
        if cache is not None and stop == len(self.layers):
            cache.length = pos + S
        return h

    def _decode_stream(self) -> torch.Tensor:
        """The residual stream [1, D] the layers' C decode steps update in place (bound on first use)."""
        if self._stream is None:
            D = self.config.hidden_size
            self._stream = torch.zeros(1, D)
            x_ffn = torch.zeros(1, D)
            for b in self.layers:
                b.bind_decoder(self._stream, x_ffn)
        return self._stream

    def router_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        B, S, _ = h.shape
        with torch.inference_mode():
            return self.layers[layer].router_probs(h, make_rope(self.backend, B, S, 0, self.config, self._device))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., D] -> fp32 [..., V]."""
        lead, D = h.shape[:-1], h.shape[-1]
        norm = cpu.rms_norm if self.backend == "cpu" else rms_norm
        x = norm(h.reshape(-1, D).contiguous(), self.norm, self.config.rms_norm_eps)
        with torch.inference_mode():  # half the per-op cost of no_grad: decode is op-bound
            (logits,) = self.lm_plan(x) if self.lm_plan else matmul(self.backend, x, [self.lm_head])
        return logits.view(*lead, -1)

    def release(self) -> None:
        """The file stays mapped: nothing to drop."""

    # ---- whole-model conveniences -------------------------------------------------------------
    def set_expert_mask(self, kept: dict[int, list[int]] | None) -> None:
        """Switch routing to the given ORIGINAL expert ids per layer (None clears every mask)."""
        for b in self.layers:
            if b.moe is not None:
                ids = b.moe.expert_ids.tolist()
                b.moe.allowed = None if kept is None or b.i not in kept else \
                    expert_mask(ids, kept[b.i]).to(self._device)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      observer: Observer | None = None) -> torch.Tensor:
        return self.run_layers(self.embed(input_ids), 0, len(self.layers), observer=observer, cache=cache)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                observer: Observer | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, cache, observer))

    __call__ = forward

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def eval(self):
        return self


def load_gguf_model(file, device: str = "cpu", backend: str = "auto") -> LoadedModel:
    """An emo GGUF export (a path, or its opened reader) for computation on emo's kernels
    (`backend` as emo_kernels.dispatch)."""
    reader = file if isinstance(file, GGUFFile) else gf.open_reader(Path(file))
    path = reader.path
    try:
        chosen = resolve(backend, device, gguf=True)
    except BackendError as e:
        raise EmoError(str(e)) from None
    if chosen == "llama.cpp":
        raise EmoError("the llama.cpp backend runs whole models: use emo_cli.gguf.llama_backend")
    model = GGUFModel(reader, chosen, device)
    tok = tokenizer_from_gguf(model.reader, path)
    return LoadedModel(model, tok, path, model.config, gf.gguf_fingerprint(model.reader), "gguf")
