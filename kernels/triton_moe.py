"""Fused MoE for GPUs in Triton: tokens sorted by expert, one expert per block, SwiGLU fused.

Contract (same function as every emo kernel, see __init__.py):
  * the T*S (token, slot) assignments are sorted by expert; each expert's run is padded to a
    multiple of ALIGN rows with the sentinel P = T*S, giving `sorted_ids` [P_pad];
  * `granule_expert` [P_pad / GRANULE] names the expert of every GRANULE rows, so any BLOCK_M that
    divides ALIGN sees exactly one expert per block (autotuning BLOCK_M never breaks the layout);
    a block whose first row is padding is all padding and returns at once;
  * kernel 1 computes h[p] = silu(x[t] @ gate[e].T) * (x[t] @ up[e].T) for its rows, both
    products from one pass over x (gate and up tiles share the loaded activation tile);
  * kernel 2 computes out[p] = weight[p] * (h[p] @ down[e].T); the host sums the S slots of
    each token (a fixed order, so results are deterministic; no float atomics).
Tiles are autotuned with the key (E, N, K, M_BUCKET): pruned models have unusual expert counts,
and a config tuned for 128 experts is not the one for 31; M_BUCKET (the assignment count rounded
up to a power of 4) keeps one decode step's tiles apart from a 16k-token prefill's without
re-tuning for every batch size.
Shape legend: T tokens, S slots per token, P = T*S, D hidden, F expert width, E experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ALIGN = 64  # every expert's run of sorted rows is padded to this; BLOCK_M must divide it
GRANULE = 16  # smallest BLOCK_M; granule_expert has one entry per GRANULE rows


def _configs():
    out = []
    for bm in (16, 32, 64):
        for bn, bk in ((32, 32), (64, 32), (64, 64), (128, 64)):
            for warps in (4, 8) if bn >= 64 else (4,):
                out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps))
    return out


def _interpreting() -> bool:
    return triton.knobs.runtime.interpret


def _tuned(fn):
    # Under TRITON_INTERPRET (CPU tests) timing configs is meaningless and slow: use the first.
    if _interpreting():
        return triton.autotune(configs=_configs()[:1], key=["E", "N", "K", "M_BUCKET"])(fn)
    return triton.autotune(configs=_configs(), key=["E", "N", "K", "M_BUCKET"])(fn)


@_tuned
@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, K] activations
    wg_ptr, wu_ptr,  # [E, N, K] gate / up weights
    h_ptr,  # [P, N] output: silu(gate) * up, indexed by assignment p
    sorted_ids_ptr,  # [P_pad] assignment ids sorted by expert, P = padding
    granule_expert_ptr,  # [P_pad / GRANULE] expert of every granule
    P, S,  # number of assignments, slots per token
    E, N, K, M_BUCKET,  # autotune key: experts, out features (F), in features (D), rows bucket
    stride_we, stride_wn,  # weight strides (last dim contiguous)
    PREC: tl.constexpr, GRANULE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + rows)
    if tl.load(sorted_ids_ptr + pid_m * BLOCK_M) >= P:
        return  # padding-only block
    e = tl.load(granule_expert_ptr + pid_m * (BLOCK_M // GRANULE)).to(tl.int64)
    valid = ids < P
    tok = tl.where(valid, ids // S, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = e * stride_we + offs_n[None, :] * stride_wn  # [1, BN] row starts of expert e
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xa = tl.load(x_ptr + tok[:, None] * K + kk[None, :], mask=valid[:, None] & (kk[None, :] < K), other=0.0)
        wmask = (offs_n[None, :] < N) & (kk[:, None] < K)
        wg = tl.load(wg_ptr + w_base + kk[:, None], mask=wmask, other=0.0)  # [BK, BN]
        wu = tl.load(wu_ptr + w_base + kk[:, None], mask=wmask, other=0.0)
        acc_g = tl.dot(xa.to(wg.dtype), wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(xa.to(wu.dtype), wu, acc_u, input_precision=PREC)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + ids[:, None].to(tl.int64) * N + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n[None, :] < N))


@_tuned
@triton.jit
def _down_kernel(
    h_ptr,  # [P, K] SwiGLU activations (K = F here)
    wd_ptr,  # [E, N, K] down weights (N = D)
    out_ptr,  # [P, N] weighted expert outputs
    weights_ptr,  # [P] routing weight of each assignment
    sorted_ids_ptr, granule_expert_ptr,
    P, E, N, K, M_BUCKET,
    stride_we, stride_wn,
    PREC: tl.constexpr, GRANULE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + rows)
    if tl.load(sorted_ids_ptr + pid_m * BLOCK_M) >= P:
        return
    e = tl.load(granule_expert_ptr + pid_m * (BLOCK_M // GRANULE)).to(tl.int64)
    valid = ids < P
    safe = tl.where(valid, ids, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = e * stride_we + offs_n[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        ha = tl.load(h_ptr + safe[:, None] * K + kk[None, :], mask=valid[:, None] & (kk[None, :] < K), other=0.0)
        wd = tl.load(wd_ptr + w_base + kk[:, None], mask=(offs_n[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc = tl.dot(ha.to(wd.dtype), wd, acc, input_precision=PREC)
    wt = tl.load(weights_ptr + safe, mask=valid, other=0.0).to(tl.float32)
    acc = acc * wt[:, None]
    tl.store(out_ptr + safe[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n[None, :] < N))


def align_by_expert(experts: torch.Tensor, num_experts: int):
    """[T, S] expert ids -> (sorted_ids [R] int32, granule_expert [R/GRANULE] int32).

    R = P + E*(ALIGN-1) rounded up to ALIGN is a bound on the padded length that depends only on the
    shapes, so nothing here waits for the GPU (bincount and a sized allocation would each force a
    device-to-host sync, most of a decode step's time). Rows past the real padded length are all
    padding: their blocks return at once."""
    flat = experts.reshape(-1)
    P, dev = flat.numel(), flat.device
    rows = -(-(P + num_experts * (ALIGN - 1)) // ALIGN) * ALIGN
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN  # [E]
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    rank = torch.arange(P, device=dev) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    sorted_ids = torch.full((rows,), P, dtype=torch.int32, device=dev)
    sorted_ids[starts[flat[order]] + rank] = order.to(torch.int32)
    first_row = torch.arange(0, rows, GRANULE, device=dev)  # [R/GRANULE]
    granule_expert = torch.searchsorted(ends, first_row, right=True).clamp_max(num_experts - 1).to(torch.int32)
    return sorted_ids, granule_expert


def triton_moe(
    x: torch.Tensor,  # [T, D]
    experts: torch.Tensor,  # [T, S]
    weights: torch.Tensor,  # [T, S]
    w_gate: torch.Tensor,  # [E, F, D]
    w_up: torch.Tensor,  # [E, F, D]
    w_down: torch.Tensor,  # [E, D, F]
) -> torch.Tensor:
    """The routed SwiGLU mixture -> [T, D] in x's dtype (fp32 accumulation)."""
    T, D = x.shape
    S = experts.shape[1]
    E, F, _ = w_gate.shape
    assert w_gate.shape == w_up.shape == (E, F, D) and w_down.shape == (E, D, F), "expert shapes"
    if T == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    w_gate, w_up, w_down = (w.contiguous() for w in (w_gate, w_up, w_down))
    P = T * S
    sorted_ids, granule_expert = align_by_expert(experts.to(torch.int64), E)
    prec = "ieee" if w_gate.dtype == torch.float32 else "tf32"
    h = torch.empty(P, F, device=x.device, dtype=torch.float32)
    out = torch.empty(P, D, device=x.device, dtype=torch.float32)
    rows = sorted_ids.numel()
    bucket = 64  # assignments rounded up to a power of 4: the autotuner's notion of "how big"
    while bucket < min(P, 1 << 16):
        bucket *= 4

    def grid(n):
        return lambda meta: (rows // meta["BLOCK_M"], triton.cdiv(n, meta["BLOCK_N"]))

    _gate_up_kernel[grid(F)](x, w_gate, w_up, h, sorted_ids, granule_expert, P, S, E, F, D, bucket,
                             w_gate.stride(0), w_gate.stride(1), PREC=prec, GRANULE=GRANULE)
    _down_kernel[grid(D)](h, w_down, out, weights.reshape(-1).float().contiguous(), sorted_ids,
                          granule_expert, P, E, D, F, bucket, w_down.stride(0), w_down.stride(1),
                          PREC=prec, GRANULE=GRANULE)
    return out.view(T, S, D).sum(1).to(x.dtype)
