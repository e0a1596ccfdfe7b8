"""EMO configuration with the released Hugging Face field names, and per-layer resolution.

The per-layer rules follow the released modeling code: `num_experts_per_layer` (0 = dense layer)
overrides `num_experts`; shared experts per layer come from `num_shared_experts_per_layer` or,
absent, min(num_shared_experts, the layer's count); `always_active_experts(_per_layer)` take
precedence over the shared-expert routing path.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emo_cli.errors import EmoError

SUPPORTED_MODEL_TYPES = ("emo",)
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "max_position_embeddings", "num_experts_per_tok", "dense_intermediate_size")
MAX_LAYERS = 10_000  # far above any released model; bounds the per-layer checks of a corrupt file
PER_LAYER_FIELDS = ("num_experts_per_layer", "num_shared_experts_per_layer", "always_active_experts_per_layer")


def _alternatives(annotation: str) -> list[str]:
    """'list[int | None] | None' -> ['list[int | None]', 'None']: split at top-level bars."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            out.append(annotation[start:i].strip())
            start = i + 1
    return out + [annotation[start:].strip()]


def conforms(value: Any, annotation: str) -> bool:
    """Whether a JSON value has the type a field's annotation names (bool is not an int here)."""
    for alt in _alternatives(annotation):
        if alt == "None" and value is None:
            return True
        if alt == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if alt == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if alt in ("bool", "str", "dict") and isinstance(value, {"bool": bool, "str": str, "dict": dict}[alt]):
            return True
        if alt.startswith("list[") and isinstance(value, list) and all(conforms(v, alt[5:-1]) for v in value):
            return True
    return False


@dataclass
class EmoConfig:
    vocab_size: int = 100352
    hidden_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    intermediate_size: int = 1024
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    pad_token_id: int | None = 100277
    eos_token_id: int | list[int] | None = 100257
    bos_token_id: int | None = None
    tie_word_embeddings: bool = False
    num_experts: int = 128
    num_experts_per_tok: int = 8
    num_shared_experts: int = 0
    norm_topk_prob: bool = False
    num_experts_per_layer: list[int] | None = None
    num_shared_experts_per_layer: list[int] | None = None
    always_active_experts: list[int] | None = None
    always_active_experts_per_layer: list[list[int] | None] | None = None
    dense_intermediate_size: int | None = None
    dense_mlp_bias: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    model_type: str = "emo"
    torch_dtype: str | None = None
    # Unknown keys of config.json, written back unchanged so a slim config stays loadable upstream.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "EmoConfig":
        if not isinstance(raw, dict):
            raise EmoError(f"config.json holds a JSON {type(raw).__name__}, not an object")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise EmoError(
                f"unsupported model_type {model_type!r} in config.json (emo runs EMO models: "
                f"model_type 'emo')"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        annotations = {f.name: f.type for f in dataclasses.fields(cls)}
        for k, v in kwargs.items():
            if not conforms(v, annotations[k]):
                raise EmoError(f"config: {k} is {json.dumps(v)[:40]}, expected {annotations[k]}")
        extra = {k: v for k, v in raw.items() if k not in known}
        cfg = cls(**kwargs, extra=extra)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> "EmoConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise EmoError(f"{path}: not UTF-8 text") from None
        except FileNotFoundError:
            raise EmoError(f"{path}: missing config.json (not a Hugging Face model directory)") from None
        except json.JSONDecodeError as e:
            raise EmoError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    def validate(self) -> None:
        for name in POSITIVE_FIELDS:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise EmoError(f"config: {name} must be at least 1, got {v}")
        if self.num_hidden_layers > MAX_LAYERS:
            raise EmoError(f"config: num_hidden_layers {self.num_hidden_layers} is not a real model's")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise EmoError("config: rms_norm_eps and rope_theta must be positive")
        for name in ("num_experts", "num_shared_experts"):
            if getattr(self, name) < 0:
                raise EmoError(f"config: {name} must not be negative")
        for name in PER_LAYER_FIELDS:
            v = getattr(self, name)
            if v is not None and len(v) != self.num_hidden_layers:
                raise EmoError(f"config: {name} has {len(v)} entries for {self.num_hidden_layers} layers")
        if self.hidden_size % self.num_attention_heads:
            raise EmoError("config: hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.kv_heads:
            raise EmoError("config: num_attention_heads must be divisible by num_key_value_heads")
        if self.num_experts_per_layer is not None:
            if any(n < 0 for n in self.num_experts_per_layer):
                raise EmoError("config: num_experts_per_layer must not be negative")
            if any(n == 0 for n in self.num_experts_per_layer) and not self.dense_intermediate_size:
                raise EmoError("config: a dense layer (0 experts) needs dense_intermediate_size")
        for i in range(self.num_hidden_layers):
            n, ns, aa = self.layer_experts(i), self.layer_shared(i), self.layer_always_active(i)
            if n == 0:
                continue
            if not 0 <= ns <= n or self.num_experts_per_tok > n:
                raise EmoError(f"config: layer {i} has {n} experts, fewer than its {ns} shared or "
                               f"{self.num_experts_per_tok} per token")
            if self.norm_topk_prob and (ns or aa):
                raise EmoError("config: norm_topk_prob cannot be combined with shared or always-active experts")
            if aa and any(not 0 <= a < n for a in aa):
                raise EmoError(f"config: always_active_experts of layer {i} out of range for {n} experts")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def layer_experts(self, i: int) -> int:
        """Experts in layer i, shared ones included; 0 for a dense layer."""
        if self.num_experts_per_layer is not None:
            return int(self.num_experts_per_layer[i])
        return int(self.num_experts)

    def layer_shared(self, i: int) -> int:
        n = self.layer_experts(i)
        if n == 0:
            return 0
        if self.num_shared_experts_per_layer is not None:
            return int(self.num_shared_experts_per_layer[i])
        return min(int(self.num_shared_experts or 0), n)

    def layer_always_active(self, i: int) -> tuple[int, ...]:
        if self.always_active_experts_per_layer is not None:
            aa = self.always_active_experts_per_layer[i]
        else:
            aa = self.always_active_experts
        return tuple(int(a) for a in aa) if aa else ()

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.layer_experts(i) > 0]

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]
