"""The memory planner: before any weight is loaded, what a command needs against what the machine
has, and the cheapest way to run it that fits.

Needs are counted in bytes of process (anonymous) memory, or of GPU memory on a GPU:
  weights      resident copies in the compute dtype: the whole model, or, streamed, the largest
               part held at a time (one decoder layer, or the final norm + lm_head); embeddings are
               gathered from the mapped file and cost only their rows
  activations  one batch's working set (residual stream, attention, routed expert inputs and
               intermediates, one lm_head slice) plus what the hidden-state store may keep in
               memory before it spills to a temporary file
  kv cache     chat only: keys and values of the whole context
  runtime      the interpreter, torch, datasets and the tokenizer
The mapped checkpoint itself is page cache: shared, reclaimable, not counted.

Choice (`--streaming auto`), in the compute dtype (fp32 on CPUs) first:
  * work that reads the weights once (profile, eval, prune's report): streamed, which costs the
    same reads, conversions and arithmetic as loading everything first, in a fraction of the
    memory (bench/scale.py measures both); the whole model only if streaming does not fit;
  * work that reads them many times (greedy, --max-loss-increase, router + report): the whole
    model in memory if it fits (each weight converted once), else streamed;
then, only when neither fits, the same in the checkpoint's own bf16/fp16 (slower matmuls on most
CPUs, but it runs); otherwise one line says what it needs and what there is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from emo_cli.arch.layers import MOE_CHUNK_TOKENS
from emo_cli.errors import EmoError
from emo_cli.model.api import HEAD_CHUNK_BYTES
from emo_cli.model.loading import HFModelFiles, default_dtype

GiB = 1024**3
RUNTIME_BYTES = int(0.75 * GiB)  # python + torch + datasets + tokenizers, measured idle at ~0.6 GiB
HIDDEN_STORE_CAP = 4 * GiB  # hidden states kept in memory at most; more spills to a file
HIDDEN_STORE_FLOOR = 64 * 1024**2
MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Workload:
    """The shape of the work, known before the data is read: batches of `batch_size` sequences of
    at most `seq_len` tokens, `passes` reads of the weights (0: not known, as for a model handed
    to library code); chat keeps a KV cache of `kv_tokens` and cannot stream."""

    batch_size: int = 8
    seq_len: int = 2048
    kv_tokens: int = 0
    streamable: bool = True
    passes: int = 0


@dataclass(frozen=True)
class WeightCounts:
    """Parameter counts read from the checkpoint headers."""

    total: int
    largest_layer: int
    head: int  # final norm + lm_head
    embed: int


@dataclass
class MemoryPlan:
    streaming: bool
    dtype: torch.dtype
    need: int  # bytes in all
    have: int  # bytes available (or --max-memory)
    weights: int
    activations: int
    kv_cache: int
    activation_budget: int  # bytes of hidden states a pass keeps in memory before spilling

    def describe(self) -> str:
        mode = "layer by layer (streamed)" if self.streaming else "whole model in memory"
        return (f"memory: {mode}, {str(self.dtype).replace('torch.', '')}: needs {self.need / GiB:.1f} GiB "
                f"of {self.have / GiB:.1f} GiB available")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d


def weight_counts(files: HFModelFiles) -> WeightCounts:
    ckpt = files.ckpt
    per_layer: dict[int, int] = {}
    total = 0
    for name in ckpt.names():
        n = 1
        for s in ckpt.shape(name):
            n *= int(s)
        total += n
        layer = files.names.parse(name).layer
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + n
    size = lambda name: int(torch.Size(ckpt.shape(name)).numel()) if name in ckpt.headers else 0  # noqa: E731
    return WeightCounts(total=total, largest_layer=max(per_layer.values(), default=0),
                        head=size(files.names.final_norm) + size(files.names.lm_head),
                        embed=size(files.names.embed))


def available_memory(device: str) -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit; on a GPU
    the device's free memory."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import psutil

        avail = int(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(avail, 0)


def estimate(cfg, counts: WeightCounts, dtype: torch.dtype, streaming: bool, work: Workload) -> tuple[int, int, int]:
    """(weights, one batch's activations, kv cache) in bytes."""
    item = torch.empty((), dtype=dtype).element_size()
    if streaming:
        weights = max(counts.largest_layer, counts.head) * item
    else:
        weights = counts.total * item
    D, F, K = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    E = max([cfg.layer_experts(i) for i in range(cfg.num_hidden_layers)] + [1])
    B, S = work.batch_size, work.seq_len
    T = B * S
    residual = 8 * T * D * item  # h, normed h, q, k, v, attention output, residual sums
    scores = B * S * S * 4  # one head of attention scores, when a kernel materialises them
    Tc = min(T, MOE_CHUNK_TOKENS)  # the expert kernels run on chunks of this many tokens
    experts = Tc * K * (3 * D + 2 * F) * item + 4 * T * E * 4  # gathered inputs, outputs, weighted outputs, gate/up; logits/probs
    head = 3 * min(T * cfg.vocab_size * 4, HEAD_CHUNK_BYTES)  # logits, log-softmax, workspace
    kv = work.kv_tokens * cfg.num_hidden_layers * 2 * cfg.kv_heads * cfg.head_dim * item
    return weights, residual + scores + experts + head, kv


def _plan(files: HFModelFiles, counts: WeightCounts, dtype: torch.dtype, streaming: bool, work: Workload,
          have: int) -> MemoryPlan:
    weights, act, kv = estimate(files.config, counts, dtype, streaming, work)
    need = RUNTIME_BYTES + weights + act + kv + HIDDEN_STORE_FLOOR
    budget = int(min(HIDDEN_STORE_CAP, max(HIDDEN_STORE_FLOOR, (have - need) // 2)))
    return MemoryPlan(streaming, dtype, need, have, weights, act, kv, budget)


def _candidates(files: HFModelFiles, device: str, dtype: torch.dtype | None, streaming: str, work: Workload):
    """(dtype, streaming) pairs in order of preference."""
    ckpt_dtype = files.ckpt.dtype(files.names.embed)
    first = dtype or default_dtype(device, ckpt_dtype)
    dtypes = [first] if dtype is not None or ckpt_dtype not in (torch.bfloat16, torch.float16) else \
        list(dict.fromkeys([first, ckpt_dtype]))
    auto = ([True, False] if work.passes == 1 else [False, True]) if work.streamable else [False]
    modes = {"off": [False], "on": [True], "auto": auto}[streaming]
    return [(dt, s) for dt in dtypes for s in modes]


def plan_memory(files: HFModelFiles, device: str, dtype: torch.dtype | None, streaming: str = "auto",
                max_memory_gib: float | None = None, work: Workload = Workload(), what: str = "this command") -> MemoryPlan:
    """The plan that fits (see the module doc), or EmoError naming what it needs and what there is."""
    if streaming not in MODES:
        raise EmoError(f"--streaming {streaming!r}: use auto, on or off")
    if max_memory_gib is not None and max_memory_gib <= 0:
        raise EmoError("--max-memory must be a positive number of GiB")
    if streaming == "on" and not work.streamable:
        raise EmoError(f"{what} keeps the whole model (it cannot stream layer by layer); use --streaming auto or off")
    have = int(max_memory_gib * GiB) if max_memory_gib is not None else available_memory(device)
    counts = weight_counts(files)
    tried = []
    for dt, s in _candidates(files, device, dtype, streaming, work):
        plan = _plan(files, counts, dt, s, work, have)
        if plan.need <= have:
            return plan
        tried.append(plan)
    best = min(tried, key=lambda p: p.need)
    how = ("layer by layer" if best.streaming else "with the whole model in memory") + \
        f" in {str(best.dtype).replace('torch.', '')}"
    hint = "; --streaming on holds one layer at a time" if streaming == "off" and work.streamable else ""
    where = (f"--max-memory allows {have / GiB:.1f} GiB" if max_memory_gib is not None
             else f"this machine has {have / GiB:.1f} GiB available")
    raise EmoError(f"{what} needs {best.need / GiB:.1f} GiB ({how}), {where}{hint} "
                   f"(a smaller --batch-size or --seq-len needs less)")


def command_estimates(files: HFModelFiles, device: str = "cpu") -> dict:
    """For `emo info`: per command, the memory each way of running it needs, and what `auto` picks
    on this machine now."""
    have = available_memory(device)
    counts = weight_counts(files)
    ctx = int(files.config.max_position_embeddings)
    commands = {"profile / eval / prune": Workload(passes=1), "greedy / --max-loss-increase": Workload(passes=8),
                "chat": Workload(1, ctx, ctx, streamable=False)}
    out = {"available_gib": round(have / GiB, 2), "commands": {}}
    for name, work in commands.items():
        needs = {}
        for dt, s in _candidates(files, device, None, "auto", work):
            label = f"{'streamed' if s else 'in memory'}, {str(dt).replace('torch.', '')}"
            needs[label] = round(_plan(files, counts, dt, s, work, have).need / GiB, 2)
        try:
            auto = plan_memory(files, device, None, "auto", None, work, name).describe().removeprefix("memory: ")
        except EmoError as e:
            auto = f"refused: {e}"
        out["commands"][name] = {"needs_gib": needs, "auto": auto}
    return out
