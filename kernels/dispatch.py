"""Choose the MoE backend once, when a model is loaded.

  auto       CUDA: triton (torch if triton is not installed); CPU: the quantized CPU kernels for a
             GGUF file (they run its Q8_0/Q4_0/F16/F32 weights in place, with llama.cpp's
             arithmetic), the grouped torch path for an HF directory
  cpu        cpu_kernels.c through ctypes (GGUF weights read in place)
  triton     triton_moe (CUDA; on CPU only under TRITON_INTERPRET=1, for tests)
  torch      grouped.py (dense stacked weights; autograd-friendly)
  llama.cpp  not a kernel: the whole GGUF runs in llama-cpp-python (see emo_cli.llama_backend)

`resolve` raises BackendError (a ValueError with a one-line reason) when the choice cannot run.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

BACKENDS = ("auto", "cpu", "triton", "torch", "llama.cpp")


class BackendError(ValueError):
    """The requested backend cannot run here; the message says why in one line."""


def triton_available(device: str) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend: str, device: str, gguf: bool) -> str:
    """The concrete backend for `backend` on `device` ("cpu", "cuda", "cuda:1") and model kind."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r} (use {', '.join(BACKENDS)})")
    on_cuda = device.startswith("cuda")
    if backend == "auto":
        if on_cuda:
            return "triton" if triton_available(device) else "torch"
        if gguf:
            from . import cpu

            return "cpu" if cpu.available() else "torch"
        return "torch"
    if backend == "cpu":
        if on_cuda:
            raise BackendError("--backend cpu runs on the CPU; drop --device cuda or use --backend triton")
        from . import cpu

        try:
            cpu.library()
        except cpu.KernelUnavailable as e:
            raise BackendError(f"--backend cpu is unavailable: {e}") from None
        return "cpu"
    if backend == "triton" and not triton_available(device):
        if importlib.util.find_spec("triton") is None:
            raise BackendError("--backend triton needs triton: pip install triton (and a CUDA GPU)")
        raise BackendError("--backend triton needs a CUDA GPU (use --backend cpu or auto here)")
    if backend == "llama.cpp":
        if not gguf:
            raise BackendError("--backend llama.cpp runs .gguf files; export the model with `emo export` first")
        if importlib.util.find_spec("llama_cpp") is None:
            raise BackendError("--backend llama.cpp needs llama-cpp-python: pip install llama-cpp-python==0.3.36")
    return backend


def moe_function(backend: str) -> Callable:
    """The MoE over dense stacked weights for a resolved backend, with grouped_moe's signature
    (x [T, D], experts [T, S], weights [T, S], w_gate/w_up [E, F, D], w_down [E, D, F]) -> [T, D]."""
    if backend == "triton":
        from .triton_moe import triton_moe

        return triton_moe
    from .grouped import grouped_moe

    return grouped_moe
