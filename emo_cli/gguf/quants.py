"""The quant types emo writes and reads, declared once: `--quant`'s choices (export, prune), the file
types a GGUF records, and the tensor types the GGUF runtime computes with. Light to import (no
torch): the command line builds its choices from it at start-up."""

from __future__ import annotations

from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from emo_cli.errors import EmoError

# name -> (general.file_type, tensor type written by gguf-py; None = K-quant done by llama.cpp)
QUANTS: dict[str, tuple[LlamaFileType, QT | None]] = {
    "f32": (LlamaFileType.ALL_F32, QT.F32),
    "f16": (LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, QT.Q4_0),
    "q5_0": (LlamaFileType.MOSTLY_Q5_0, QT.Q5_0),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, None),
    "q5_k_m": (LlamaFileType.MOSTLY_Q5_K_M, None),
    "q6_k": (LlamaFileType.MOSTLY_Q6_K, None),
}


def quant_types(name: str) -> tuple[LlamaFileType, QT | None]:
    """(general.file_type, tensor type) of quant `name`, or the one-line error that lists them."""
    if name not in QUANTS:
        raise EmoError(f"unknown quant {name!r} (use {', '.join(QUANTS)})")
    return QUANTS[name]


# Tensor types emo computes with (natively or through gguf-py's dequantizers); others are refused
# when a file is opened.
READABLE_TYPES = frozenset({QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
                            QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K})


def quant_name(file_type: int | None) -> str:
    """Our quant name for a general.file_type value (llama.cpp's name, lowercased, if not ours)."""
    if file_type is None:
        return "unknown"
    for name, (ft, _) in QUANTS.items():
        if int(ft) == int(file_type):
            return name
    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return f"file_type {file_type}"
