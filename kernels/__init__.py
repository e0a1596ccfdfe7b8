"""emo's MoE kernels, importable as `emo_kernels` (the top-level folder is `kernels/`; the PyPI
package named `kernels` is unrelated, hence the distinct import path).

Every kernel computes the same function, the routed SwiGLU mixture:
    y[t] = sum_k weights[t, k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),  e = experts[t, k]
Shape legend: T tokens, D hidden, F expert width, E experts, K slots per token.
"""
