"""emo's MoE kernels, importable as `emo_kernels` (the top-level folder is `kernels/`; the PyPI
package named `kernels` is unrelated, hence the distinct import path).

Every kernel computes the same function, the routed SwiGLU mixture:
    y[t] = sum_k weights[t, k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),  e = experts[t, k]
Shape legend: T tokens, D hidden, F expert width, E experts, K slots per token.

  reference   float64 oracle (and the activation roundings the quantized kernels apply)
  grouped     plain torch, tokens grouped by expert (training and the default HF path)
  cpu         C kernels via ctypes: quantized weights read in place from a GGUF map (cpu_kernels.c)
  triton_moe  fused Triton kernel for CUDA (tests run it under TRITON_INTERPRET=1)
  dispatch    picks one of them once, at load time
"""
