"""The EMO architecture (allenai/EMO `modeling_emo.py` semantics), written for emo: its config with
the released Hugging Face field names, the decoder block and model, where its weights sit in the
released checkpoints (`NAMES`), and the llama.cpp architecture that runs its GGUF export.

The per-layer config rules follow the released modeling code: `num_experts_per_layer` (0 = dense
layer) overrides `num_experts`; shared experts per layer come from `num_shared_experts_per_layer`
or, absent, min(num_shared_experts, the layer's count); `always_active_experts(_per_layer)` take
precedence over the shared-expert routing path.

Shape legend: B batch, S sequence, D hidden, E experts in the layer (shared included), V vocab.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from emo_cli.arch.config import MAX_LAYERS, read_config_json, typed_fields
from emo_cli.arch.layers import (
    DEFAULT_ACTIVATION_BUDGET,
    Attention,
    DenseMLP,
    KVCache,
    MoEBlock,
    Observer,
    RMSNorm,
    rope_for,
    run_blocks,
)
from emo_cli.arch.routing import route
from emo_cli.arch.spec import Architecture, TensorNames
from emo_cli.errors import EmoError

MODEL_TYPE = "emo"
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "max_position_embeddings", "num_experts_per_tok", "dense_intermediate_size")
PER_LAYER_FIELDS = ("num_experts_per_layer", "num_shared_experts_per_layer", "always_active_experts_per_layer")


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
    model_type: str = MODEL_TYPE
    torch_dtype: str | None = None
    # Unknown keys of config.json, written back unchanged so a slim config stays loadable upstream.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "EmoConfig":
        if not isinstance(raw, dict):
            raise EmoError(f"config.json holds a JSON {type(raw).__name__}, not an object")
        if raw.get("model_type") != cls.model_type:  # a subclass may name its own variant
            raise EmoError(f"unsupported model_type {raw.get('model_type')!r} in config.json (emo runs EMO models: "
                           f"model_type '{cls.model_type}')")
        kwargs, extra = typed_fields(cls, raw)
        cfg = cls(**kwargs, extra=extra)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> "EmoConfig":
        return cls.from_dict(read_config_json(path))

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


class Block(nn.Module):
    def __init__(self, cfg: EmoConfig, i: int):
        super().__init__()
        self.index = i
        self.pre_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        n = cfg.layer_experts(i)
        if n == 0:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size, cfg.dense_mlp_bias)
        else:
            self.mlp = MoEBlock(cfg, i, n, cfg.layer_shared(i), cfg.layer_always_active(i))

    def attend(self, h, cos, sin, cache=None, start=0):
        """First half of the block: the residual stream after attention."""
        return h + self.self_attn(self.pre_attention_layernorm(h), cos, sin, cache, self.index, start)

    def forward(self, h, cos, sin, cache, start, observer=None, allowed=None, **pool_kw):
        h = self.attend(h, cos, sin, cache, start)
        if isinstance(self.mlp, DenseMLP):
            return h + self.mlp(self.pre_feedforward_layernorm(h))
        return h + self.mlp(self.pre_feedforward_layernorm(h), observer=observer, allowed=allowed, **pool_kw)

    def router_probs(self, h, cos, sin) -> torch.Tensor:
        """Unmasked routing probabilities [T, E] of this layer's MoE block for its input h [B, S, D]
        (the attention half and the router only: EMO's layerwise router method needs no experts)."""
        x = self.pre_feedforward_layernorm(self.attend(h, cos, sin))
        return route(x.reshape(-1, x.shape[-1]) @ self.mlp.router.t(), self.mlp.spec).probs


class EmoForCausalLM(nn.Module):
    """State-dict names mirror the released HF names, with experts stacked per layer."""

    def __init__(self, cfg: EmoConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_budget = DEFAULT_ACTIVATION_BUDGET  # model/memory.py sets it for the work at hand

    # ---- helpers ------------------------------------------------------------------------------
    def moe_blocks(self) -> dict[int, MoEBlock]:
        return {i: b.mlp for i, b in enumerate(self.layers) if isinstance(b.mlp, MoEBlock)}

    def set_expert_mask(self, kept: dict[int, list[int]] | None) -> None:
        """Restrict routing to the given ORIGINAL expert ids per layer (None clears every mask)."""
        for i, blk in self.moe_blocks().items():
            if kept is None or i not in kept:
                blk.allowed = None
                continue
            keep = set(int(e) for e in kept[i])
            blk.allowed = torch.tensor([int(e) in keep for e in blk.expert_ids.tolist()],
                                       device=blk.router.device)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ---- the model interface (emo_cli/model/api.py) --------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def expert_ids(self) -> list[list[int] | None]:
        return [b.mlp.expert_ids.tolist() if isinstance(b.mlp, MoEBlock) else None for b in self.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids.to(self.device))  # [B, S, D]

    def run_layers(self, h: torch.Tensor, start: int, stop: int, masks: dict | None = None,
                   observer: Observer | None = None, cache: KVCache | None = None, **pool_kw) -> torch.Tensor:
        """Layers [start, stop) on the residual stream h [B, S, D]; masks: layer -> [E] or [T, E] bool."""
        return run_blocks(self.config, self.layers.__getitem__, h, start, stop, masks, observer, cache,
                          self.device, **pool_kw)

    def router_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.layers[layer].router_probs(h, *self.rope(h.shape[1]))  # [T, E]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()  # [..., V]

    def release(self) -> None:
        """Everything stays resident: nothing to drop."""

    # ---- whole-model conveniences -------------------------------------------------------------
    def rope(self, S: int, start: int = 0):
        return rope_for(self.config, S, start, self.device)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      observer: Observer | None = None, **pool_kw) -> torch.Tensor:
        """The residual stream [B, S, D] after the last layer."""
        return self.run_layers(self.embed(input_ids), 0, len(self.layers), observer=observer, cache=cache, **pool_kw)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                observer: Observer | None = None, **pool_kw) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, cache, observer, **pool_kw))

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))


# ---- where the weights sit ---------------------------------------------------------------------
# The released checkpoints' names. Experts are stored one tensor per expert and projection; the
# block stacks them ([E, F, D] w_gate/w_up, [E, D, F] w_down) and calls the router `mlp.router`.
# A legacy shared expert is the layer's last expert index.
NAMES = TensorNames(
    embed="model.embed_tokens.weight",
    final_norm="model.norm.weight",
    lm_head="lm_head.weight",
    layer="model.layers.{i}.",
    router="mlp.gate.weight",
    expert="mlp.experts.{j}.{proj}.weight",
    expert_projs={"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"},
    attention={"attn_norm": "pre_attention_layernorm.weight", "q": "self_attn.q_proj.weight",
               "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
               "ffn_norm": "pre_feedforward_layernorm.weight"},
    dense={"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"},
)

# llama.cpp's `deepseek` runs EMO exactly: routed experts stacked, the shared expert as `shexp`
# (docs/design.md#the-gguf-layout; gguf/layout.py holds the names).
ARCH = Architecture(model_type=MODEL_TYPE, config_class=EmoConfig, model_class=EmoForCausalLM, block_class=Block,
                    names=NAMES, gguf_arch="deepseek", hf_architectures=["EmoForCausalLM"])
