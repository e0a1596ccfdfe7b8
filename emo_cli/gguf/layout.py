"""How an EMO model is laid out in GGUF, shared by the exporter, `emo info` and the GGUF runtime.

The mapping is llama.cpp's `deepseek` architecture (docs/design.md#the-gguf-layout), which runs EMO exactly:
  * routed experts of a layer are stacked into `ffn_{gate,up,down}_exps` (numpy [E_r, F, D] /
    [E_r, D, F]); the router `ffn_gate_inp` [E_r, D] holds only the routed rows, because EMO's one
    shared expert (the last index) always has weight exactly 1.0 — llama.cpp adds `ffn_*_shexp`
    unweighted. A model without a shared expert gets an all-zero shexp (deepseek requires one).
  * q and k rows are permuted per head so llama.cpp's NORM RoPE (pairs 2i, 2i+1) equals EMO's
    NeoX RoPE (pairs i, i + hd/2); `unpermute_qk` undoes it.
  * leading dense layers use `leading_dense_block_count` and `ffn_{gate,up,down}`.
Numpy shapes are given everywhere (the GGUF `ne` order is their reverse).

`emo.*` keys carry what llama.cpp ignores but emo needs back: the number of real shared experts
(0 means the shexp is the zero filler), and pruning provenance.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
from gguf import Keys

from emo_cli.arch.emo import EmoConfig
from emo_cli.errors import EmoError
from emo_cli.gguf.reader import GGUFFile

ARCH = "deepseek"

# ---- tensor names --------------------------------------------------------------------------------
TOKEN_EMBD = "token_embd.weight"  # [V, D]
OUTPUT_NORM = "output_norm.weight"  # [D]
OUTPUT = "output.weight"  # [V, D]
ATTN_NORM = "attn_norm"  # [D]
ATTN_Q = "attn_q"  # [H*hd, D], rows permuted
ATTN_K = "attn_k"  # [Hkv*hd, D], rows permuted with the KV head count
ATTN_V = "attn_v"  # [Hkv*hd, D]
ATTN_OUT = "attn_output"  # [D, H*hd]
FFN_NORM = "ffn_norm"  # [D]
FFN_GATE_INP = "ffn_gate_inp"  # [E_r, D] router, routed experts only
FFN_GATE_EXPS = "ffn_gate_exps"  # [E_r, F, D]
FFN_UP_EXPS = "ffn_up_exps"  # [E_r, F, D]
FFN_DOWN_EXPS = "ffn_down_exps"  # [E_r, D, F]
FFN_GATE_SHEXP = "ffn_gate_shexp"  # [F, D]
FFN_UP_SHEXP = "ffn_up_shexp"  # [F, D]
FFN_DOWN_SHEXP = "ffn_down_shexp"  # [D, F]
FFN_GATE = "ffn_gate"  # dense layer [Fd, D]
FFN_UP = "ffn_up"  # [Fd, D]
FFN_DOWN = "ffn_down"  # [D, Fd]

ATTN_TENSORS = (ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT, FFN_NORM)
MOE_TENSORS = (FFN_GATE_INP, FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS,
               FFN_GATE_SHEXP, FFN_UP_SHEXP, FFN_DOWN_SHEXP)
DENSE_TENSORS = (FFN_GATE, FFN_UP, FFN_DOWN)
# Tensors llama.cpp keeps in f32 whatever the file type: norms, and the router (routing decisions
# flip easily, and llama.cpp's own quantizer never touches ffn_gate_inp).
KEEP_F32 = (ATTN_NORM, FFN_NORM, FFN_GATE_INP, OUTPUT_NORM)


def blk(layer: int, name: str) -> str:
    return f"blk.{layer}.{name}.weight"


def keeps_f32(name: str) -> bool:
    return any(name == k or name.endswith(f".{k}.weight") for k in KEEP_F32)


# ---- metadata keys -------------------------------------------------------------------------------
def key(template: str) -> str:
    return template.format(arch=ARCH)


K_CONTEXT = key(Keys.LLM.CONTEXT_LENGTH)
K_EMBD = key(Keys.LLM.EMBEDDING_LENGTH)
K_BLOCKS = key(Keys.LLM.BLOCK_COUNT)
K_FF = key(Keys.LLM.FEED_FORWARD_LENGTH)  # dense layers' width
K_VOCAB = key(Keys.LLM.VOCAB_SIZE)
K_LEADING_DENSE = key(Keys.LLM.LEADING_DENSE_BLOCK_COUNT)
K_EXPERT_FF = key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)
K_EXPERTS = key(Keys.LLM.EXPERT_COUNT)  # routed experts per layer
K_EXPERTS_USED = key(Keys.LLM.EXPERT_USED_COUNT)  # routed top-k (shared excluded)
K_EXPERTS_SHARED = key(Keys.LLM.EXPERT_SHARED_COUNT)  # always 1 (zero-filled when the model has none)
K_EXPERT_SCALE = key(Keys.LLM.EXPERT_WEIGHTS_SCALE)
K_HEADS = key(Keys.Attention.HEAD_COUNT)
K_HEADS_KV = key(Keys.Attention.HEAD_COUNT_KV)
K_RMS_EPS = key(Keys.Attention.LAYERNORM_RMS_EPS)
K_ROPE_BASE = key(Keys.Rope.FREQ_BASE)
K_ROPE_DIM = key(Keys.Rope.DIMENSION_COUNT)

# emo's own keys (llama.cpp ignores unknown keys).
K_EMO_SHARED = "emo.shared_experts"  # real shared experts per MoE layer: 1, or 0 = zero shexp
K_EMO_SOURCE_FINGERPRINT = "emo.source_fingerprint"  # fingerprint of the exported HF directory
# Pruning provenance: provenance dict field -> GGUF key (strings; the id lists as JSON).
PROVENANCE_KEYS = {
    "source_model": "emo.source_model",
    "experts_kept_per_layer": "emo.experts_kept_per_layer",  # original ids, HF order (shared last)
    "method": "emo.pruning_method",
    "budget": "emo.budget",
    "profile_fingerprint": "emo.profile_fingerprint",
}
# The same facts under the names of EMO's pruning_metadata.json (what `emo info` shows for HF dirs).
PROVENANCE_METADATA_NAMES = {
    "source_model": "original_model",
    "experts_kept_per_layer": "experts_kept_per_layer",
    "method": "pruning_method",
    "budget": "budget",
    "profile_fingerprint": "profile_fingerprint",
}

# ---- q/k permutation for NORM RoPE ----------------------------------------------------------------
def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows [n_heads*hd, ...] from NeoX order (i, i+hd/2) to interleaved order (2i, 2i+1) per head."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_qk`: back to the NeoX row order emo's runtime uses."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- reading -------------------------------------------------------------------------------------
def open_reader(path: Path) -> GGUFFile:
    """The file's header, metadata and tensor table (gguf/reader.py); tensor bytes stay on disk until used."""
    try:
        return GGUFFile(path)
    except FileNotFoundError:
        raise EmoError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise EmoError(f"{path}: a directory, not a GGUF file") from None
    except PermissionError:
        raise EmoError(f"{path}: permission denied") from None
    except MemoryError:
        raise EmoError(f"{path}: not a valid GGUF file (its header asks for more memory than there is)") from None
    except (ValueError, OSError, struct.error, OverflowError) as e:  # GGUFFormatError says what is wrong
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise EmoError(f"{path}: not a valid GGUF file ({reason})") from None


def field(reader: GGUFFile, name: str, default=None):
    f = reader.get_field(name)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # a damaged value (bad UTF-8, wrong length): the file is invalid, say which key
        raise EmoError(f"GGUF key {name} is unreadable (damaged file)") from None


def float_field(reader: GGUFFile, name: str, default: float) -> float:
    """A float32 key as the decimal it was written from (1e-6 rather than 9.99999997e-07)."""
    v = field(reader, name)
    if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
        raise EmoError(f"GGUF key {name} is {str(v)[:40]}, not a number")
    return default if v is None else float(str(np.float32(v)))


def provenance(reader: GGUFFile) -> dict:
    """The pruning provenance stored in the file, by provenance field name (absent keys omitted)."""
    out = {}
    for name, k in PROVENANCE_KEYS.items():
        v = field(reader, k)
        if v is not None:
            if name == "experts_kept_per_layer":
                try:
                    v = json.loads(v)
                except (TypeError, ValueError):
                    raise EmoError(f"GGUF key {k} is not the JSON list emo writes") from None
            out[name] = v
    return out


def config_from_gguf(reader: GGUFFile, path: Path | str = "") -> EmoConfig:
    """The EmoConfig of an exported file (what the HF config.json said, in emo's field names)."""
    arch = field(reader, Keys.General.ARCHITECTURE)
    if arch != ARCH:
        raise EmoError(f"{path}: GGUF architecture {arch!r} is not an emo export ({ARCH!r})")
    missing = [k for k in (K_EMBD, K_BLOCKS, K_HEADS, K_EXPERTS, K_EXPERTS_USED, K_EXPERT_FF)
               if reader.get_field(k) is None]
    if missing:
        raise EmoError(f"{path}: GGUF lacks required key {missing[0]}")
    names = {t.name: t for t in reader.tensors}
    if TOKEN_EMBD not in names:
        raise EmoError(f"{path}: GGUF has no {TOKEN_EMBD}")
    for k in (K_EMBD, K_BLOCKS, K_HEADS, K_EXPERTS, K_EXPERTS_USED, K_EXPERT_FF, K_LEADING_DENSE, K_EMO_SHARED,
              K_EXPERTS_SHARED, K_HEADS_KV, K_CONTEXT, K_FF):
        v = field(reader, k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise EmoError(f"{path}: GGUF key {k} is {str(v)[:40]}, not a count")
    n_layers = field(reader, K_BLOCKS)
    if not 1 <= n_layers <= len(names) // len(ATTN_TENSORS):
        raise EmoError(f"{path}: GGUF claims {n_layers} layers but holds {len(names)} tensors")
    n_dense = field(reader, K_LEADING_DENSE, 0)
    if n_dense > n_layers:
        raise EmoError(f"{path}: GGUF has {n_dense} leading dense layers of {n_layers}")
    shared = field(reader, K_EMO_SHARED, field(reader, K_EXPERTS_SHARED, 0))
    if shared > 1:
        raise EmoError(f"{path}: {shared} shared experts per layer; emo reads deepseek files with at most 1")
    n_routed = field(reader, K_EXPERTS)
    n_experts = n_routed + shared
    eos = field(reader, Keys.Tokenizer.EOS_ID)
    if len(names[TOKEN_EMBD].shape) != 2:
        raise EmoError(f"{path}: {TOKEN_EMBD} is not a matrix")
    return EmoConfig.from_dict(dict(
        model_type="emo", vocab_size=int(names[TOKEN_EMBD].shape[1]),  # GGUF ne order: {D, V}
        hidden_size=field(reader, K_EMBD), num_hidden_layers=n_layers,
        num_attention_heads=field(reader, K_HEADS), num_key_value_heads=field(reader, K_HEADS_KV),
        intermediate_size=field(reader, K_EXPERT_FF),
        max_position_embeddings=field(reader, K_CONTEXT, 4096),
        rms_norm_eps=float_field(reader, K_RMS_EPS, 1e-6), rope_theta=float_field(reader, K_ROPE_BASE, 10000.0),
        pad_token_id=field(reader, Keys.Tokenizer.PAD_ID), eos_token_id=eos, bos_token_id=None,
        num_experts=n_experts, num_experts_per_tok=field(reader, K_EXPERTS_USED) + shared,
        num_shared_experts=shared,
        num_experts_per_layer=[0] * n_dense + [n_experts] * (n_layers - n_dense) if n_dense else None,
        dense_intermediate_size=field(reader, K_FF) if n_dense else None,
    ))


def gguf_fingerprint(reader: GGUFFile) -> str:
    """Identity of a GGUF model: every tensor's name, type and shape plus the architecture keys."""
    h = hashlib.sha256()
    for k in sorted(reader.fields):
        if k.startswith(ARCH + "."):
            h.update(f"{k}={field(reader, k)}".encode())
    for t in sorted(reader.tensors, key=lambda t: t.name):
        h.update(f"{t.name}:{t.tensor_type.name}:{[int(s) for s in t.shape]}".encode())
    return h.hexdigest()[:16]
