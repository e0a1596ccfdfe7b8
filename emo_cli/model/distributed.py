"""Data-parallel passes with torch.distributed, under torchrun's environment contract.

    torchrun --nproc-per-node 4 -m emo_cli profile data/med.jsonl
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m emo_cli eval ...

Every rank builds the same token batches in the same order (tokenization is deterministic), then
runs only batches rank, rank + size, ... through the same pass (streamed or in memory, on
cuda:LOCAL_RANK or the CPU). Because each batch is exactly the batch a single process would run,
per-document and per-choice results are bit-identical to one process; profile statistics are
float64 sums whose order alone differs. What the passes reduce is small (an [L, E] profile, one
number per document or choice), so it travels as float64 host tensors over Gloo, on GPUs too.
Rank 0 alone writes outputs and prints; any rank that fails prints one line naming itself and
exits non-zero, and torchrun then stops the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from emo_cli.errors import EmoError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """The rank that writes outputs and prints results."""
        return self.rank == 0

    def mine(self, n: int) -> list[int]:
        """The indices (of n batches) this rank runs: a fixed round-robin share."""
        return list(range(self.rank, n, self.size))

    def sum(self, *parts) -> list[torch.Tensor]:
        """Element-wise float64 sums over all ranks of each tensor or number in `parts`, in one
        collective; every rank gets them, in the parts' shapes."""
        flat = [torch.as_tensor(p, dtype=torch.float64).detach().cpu() for p in parts]
        if self.size == 1:
            return flat
        import torch.distributed as dist

        buf = torch.cat([f.reshape(-1) for f in flat])
        dist.all_reduce(buf)
        return [chunk.view(f.shape) for chunk, f in zip(buf.split([f.numel() for f in flat]), flat)]

    def device(self, device: str) -> str:
        """Each rank's own GPU: `cuda` means cuda:LOCAL_RANK under torchrun."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.size > 1 else device


_WORLD = World()


def world() -> World:
    return _WORLD


def init_from_env() -> World:
    """Join the process group torchrun (or any launcher with its env contract) describes:
    WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. One process: nothing to join."""
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return _WORLD
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    except (KeyError, ValueError):
        raise EmoError("WORLD_SIZE > 1 but RANK is not set: start emo with torchrun") from None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    _WORLD = World(rank, size, local)
    return _WORLD
