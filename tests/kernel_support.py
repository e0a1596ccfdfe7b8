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
