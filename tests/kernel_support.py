"""Whether emo's CPU kernels run on this machine (they need a C compiler and AVX2/FMA/F16C, found
at run time). Tests of the kernels themselves are skipped where they cannot run, with the reason;
everything else falls back to the torch backend, as `--backend auto` does."""

import pytest

from emo_kernels import cpu


def _missing() -> str:
    try:
        cpu.library()
    except cpu.KernelUnavailable as e:
        return str(e)
    return ""


CPU_KERNELS_MISSING = _missing()
needs_cpu_kernels = pytest.mark.skipif(
    bool(CPU_KERNELS_MISSING),
    reason=f"emo's CPU kernels are unavailable here ({CPU_KERNELS_MISSING}); --backend auto uses torch")


def cpu_param(*values):
    """A parametrize entry that needs the CPU kernels."""
    return pytest.param(*values, marks=needs_cpu_kernels)


def llama_takes_our_simd_path() -> bool:
    """Whether this llama.cpp build sums in the vector widths that emo's chosen kernel build follows
    (AVX-512 with VNNI, or AVX2 without AVX-512): then emo computes its operations in its order."""
    llama_cpp = pytest.importorskip("llama_cpp")

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    wide = "AVX512 = 1" in info
    if cpu.chosen_variant() == "avx512vnni":
        return wide and "AVX512_VNNI = 1" in info
    return not wide and "AVX2 = 1" in info
