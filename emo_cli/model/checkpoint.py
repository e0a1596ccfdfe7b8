"""Hugging Face checkpoint files: lazy, memory-mapped reading of (sharded) safetensors, and
streaming writing of shards plus index. Weights are never unpickled. The names are the
architecture's (arch/spec.py TensorNames): experts one tensor each on disk, stacked per layer in emo.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emo_cli.errors import EmoError
from emo_cli.outputs import follow_umask

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
# numpy carriers of the same width: bf16 has no numpy dtype, so it travels as uint16 and is
# reinterpreted by torch (a view, no copy)
_CARRIERS = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16, "F64": np.float64}
_WIDTHS = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header (names, dtypes, shapes, byte ranges) and where the data starts,
    without touching tensor data."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise EmoError(f"{path}: missing safetensors shard") from None
    except IsADirectoryError:
        raise EmoError(f"{path}: a directory, not a safetensors file") from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise EmoError(f"{path}: not a valid safetensors file") from None
    if not isinstance(header, dict):
        raise EmoError(f"{path}: not a valid safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    return header, 8 + n


def _entry_problem(info, data_start: int, size: int) -> str | None:
    """What is wrong with one header entry (dtype, shape, byte range inside the file), or None."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return "has no dtype"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"has an invalid shape {str(shape)[:40]}"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"has invalid data offsets {str(offsets)[:40]}"
    if data_start + offsets[1] > size:
        return "lies outside the file (truncated or damaged download?)"
    width = _WIDTHS.get(info["dtype"])
    if width is not None and offsets[1] - offsets[0] != width * math.prod(shape):
        return f"has {offsets[1] - offsets[0]} bytes for shape {shape} in {info['dtype']}"
    return None


class SafetensorsCheckpoint:
    """Tensor name -> shard map of a model directory; tensors are read on demand (mmap)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise EmoError(f"{index}: invalid safetensors index (no weight_map)") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) and v == Path(v).name and v.endswith(".safetensors") for v in weight_map.values()):
                raise EmoError(f"{index}: invalid weight_map (shards must be .safetensors files in {self.dir})")
            shards = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE_NAME).exists():
            shards = [SINGLE_NAME]
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not found:
                raise EmoError(f"{self.dir}: no model.safetensors or {INDEX_NAME} (weights missing)")
            shards = found
        self.headers: dict[str, dict] = {}
        self.shard_of: dict[str, str] = {}
        self.data_start: dict[str, int] = {}
        for shard in shards:
            header, self.data_start[shard] = _read_header(self.dir / shard)
            size = (self.dir / shard).stat().st_size
            for name, info in header.items():
                problem = _entry_problem(info, self.data_start[shard], size)
                if problem:
                    raise EmoError(f"{self.dir / shard}: tensor {name} {problem}")
                self.headers[name] = info
                self.shard_of[name] = shard
        if index.exists():
            missing = sorted(set(weight_map) - set(self.shard_of))
            if missing:
                raise EmoError(f"{self.dir}: index lists {missing[0]} but no shard holds it")
        self._handles: dict[str, object] = {}
        self._maps: dict[str, np.memmap] = {}

    def names(self) -> list[str]:
        return list(self.headers)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.headers[name]["dtype"]
        if code not in _DTYPES:
            raise EmoError(f"{self.dir}: tensor {name} has unsupported dtype {code}")
        return _DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.shard_of:
            raise EmoError(f"{self.dir}: checkpoint has no tensor {name}")
        shard = self.shard_of[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard].get_tensor(name)

    def view(self, name: str) -> torch.Tensor:
        """A read-only tensor over the memory-mapped shard: no copy, no anonymous memory. Its pages
        are file cache the kernel can drop, so streamed passes read weights straight from here.
        Never write through it."""
        if name not in self.shard_of:
            raise EmoError(f"{self.dir}: checkpoint has no tensor {name}")
        info, shard = self.headers[name], self.shard_of[name]
        code = info["dtype"]
        if code not in _CARRIERS:
            raise EmoError(f"{self.dir}: tensor {name} has unsupported dtype {code}")
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.dir / shard, dtype=np.uint8, mode="r")
        buf = self._maps[shard]
        begin, end = (self.data_start[shard] + int(o) for o in info["data_offsets"])
        carrier = np.dtype(_CARRIERS[code])
        shape = tuple(info["shape"])
        if end > buf.size or end - begin != carrier.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise EmoError(f"{self.dir / shard}: tensor {name} lies outside the file (truncated download?)")
        raw = buf[begin:end]
        if begin % carrier.itemsize:  # an unaligned tensor (old writers): copy it, rare and small
            raw = np.array(raw)
        with warnings.catch_warnings():  # torch warns that the map is read-only; it is never written
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(raw.view(carrier).reshape(shape))
        return t.view(torch.bfloat16) if code == "BF16" else t

    def prefetch(self, prefix: str) -> None:
        """Ask the kernel to start reading every tensor whose name starts with `prefix` into the
        page cache (posix_fadvise WILLNEED): a streamed pass computes one layer while the next is
        read. Advice only, so where the call is unavailable nothing happens."""
        spans: dict[str, list[int]] = {}
        for name, shard in self.shard_of.items():
            if name.startswith(prefix):
                b, e = (self.data_start[shard] + int(o) for o in self.headers[name]["data_offsets"])
                lo, hi = spans.get(shard, (b, e))
                spans[shard] = [min(lo, b), max(hi, e)]
        for shard, (b, e) in spans.items():
            try:
                fd = os.open(self.dir / shard, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, b, e - b, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except (OSError, AttributeError):
                return

    def bytes_on_disk(self) -> int:
        return sum((self.dir / s).stat().st_size for s in set(self.shard_of.values()))

    def fingerprint(self, config_text: str) -> str:
        """Identity of a model: its config, every tensor's name, dtype and shape, and the bytes of
        the (small) norm weights, so same-shaped models (EMO vs. the standard MoE) differ."""
        h = hashlib.sha256()
        h.update(json.dumps(json.loads(config_text), sort_keys=True).encode())
        for name in sorted(self.headers):
            info = self.headers[name]
            h.update(f"{name}:{info['dtype']}:{info['shape']}".encode())
            if name.endswith("norm.weight"):
                h.update(self.get(name).float().numpy().tobytes())
        return h.hexdigest()[:16]


class ShardWriter:
    """Writes tensors into size-capped safetensors shards plus the HF index, streaming.

    Files go to `out_dir`, which callers create as a temporary directory and rename on success.
    """

    def __init__(self, out_dir: Path, shard_bytes: int = 2 * 1024**3, dtype: torch.dtype | None = None):
        self.dir = Path(out_dir)
        self.shard_bytes = shard_bytes
        self.dtype = dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | str] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._n = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu")
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        self._n += 1
        tmp_name = f"shard-{self._n:05d}.tmp.safetensors"
        save_file(self.pending, str(self.dir / tmp_name), metadata={"format": "pt"})
        follow_umask(self.dir / tmp_name)  # safetensors writes 0600
        self.shards.append(tmp_name)
        for k in self.pending:
            self.weight_map[k] = tmp_name
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.dir / self.shards[0], self.dir / SINGLE_NAME)
            return
        final = {}
        for i, tmp in enumerate(self.shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp, self.dir / name)
            final[tmp] = name
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2))


def write_moe_layer(writer: ShardWriter, names, layer: int, router, w_gate, w_up, w_down) -> None:
    """Unstack one MoE layer (router [E, D], w_gate/w_up [E, F, D], w_down [E, D, F]) into the
    checkpoint's per-expert names (`names`: the architecture's TensorNames)."""
    writer.add(names.router_of(layer), router)
    stacked = {"w_gate": w_gate, "w_up": w_up, "w_down": w_down}
    for j in range(router.shape[0]):
        for ours, proj in names.expert_projs.items():
            writer.add(names.expert_of(layer, j, proj), stacked[ours][j])
