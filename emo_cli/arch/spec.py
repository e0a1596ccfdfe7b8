"""What an architecture file declares: its config class, its model classes, where its weights sit in
a Hugging Face checkpoint (a table of names, as data) and which llama.cpp architecture runs it.

Every reader and writer of checkpoints (loading, streaming, slicing, merging, GGUF export) asks the
architecture's `TensorNames` for a name, so no other module spells one out. docs/architectures.md
explains how to add an architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorRef:
    """What a checkpoint tensor name is: layer None = outside the layers (embeddings, head)."""

    layer: int | None
    expert: int | None = None  # local expert index, for an expert's tensor
    proj: str | None = None  # the expert projection, as the HF name spells it
    router: bool = False


@dataclass(frozen=True)
class TensorNames:
    """An architecture's HF tensor names. `{i}` is a layer, `{j}` a local expert index and `{proj}`
    an expert projection. Below the layer prefix, every tensor that is not the router or an expert
    is named as the decoder block's own parameter (so biases and norms need no entry)."""

    embed: str
    final_norm: str
    lm_head: str
    layer: str  # prefix of layer i's tensors, ending in "."
    router: str  # below the layer prefix: [E, D]
    expert: str  # below the layer prefix, with {j} and {proj}: [F, D] or [D, F]
    # stacked block parameter -> the projection's name in `expert`
    expert_projs: dict[str, str]
    # the roles the GGUF export maps, below the layer prefix
    attention: dict[str, str]  # attn_norm, q, k, v, o, ffn_norm
    dense: dict[str, str]  # gate, up, down of a dense (expert-free) layer

    def in_layer(self, i: int, rel: str) -> str:
        return self.layer.format(i=i) + rel

    def router_of(self, i: int) -> str:
        return self.in_layer(i, self.router)

    def expert_of(self, i: int, j: int, proj: str) -> str:
        return self.in_layer(i, self.expert.format(j=j, proj=proj))

    def __post_init__(self):
        # the templates as patterns, compiled once: parse() runs for every tensor of a checkpoint
        layer = re.escape(self.layer).replace(re.escape("{i}"), r"(?P<i>\d+)")
        expert = re.escape(self.expert).replace(re.escape("{j}"), r"(?P<j>\d+)").replace(
            re.escape("{proj}"), "(?P<proj>" + "|".join(map(re.escape, self.expert_projs.values())) + ")")
        object.__setattr__(self, "_patterns", (re.compile(layer), re.compile(layer + expert + "$"),
                                               re.compile(layer + re.escape(self.router) + "$")))

    def parse(self, name: str) -> TensorRef:
        layer_re, expert_re, router_re = self._patterns
        if m := expert_re.match(name):
            return TensorRef(int(m["i"]), int(m["j"]), m["proj"])
        if m := router_re.match(name):
            return TensorRef(int(m["i"]), router=True)
        if m := layer_re.match(name):
            return TensorRef(int(m["i"]))
        return TensorRef(None)

    def renumbered(self, name: str, j: int) -> str:
        """An expert tensor's name with its local index changed to j."""
        ref = self.parse(name)
        if ref.expert is None:
            raise ValueError(f"{name} is not an expert tensor")
        return self.expert_of(ref.layer, j, ref.proj)


@dataclass(frozen=True)
class Architecture:
    """One architecture, found by the `model_type` of its config.json (arch/registry.py)."""

    model_type: str
    config_class: type  # from_dict / from_file / to_dict, validated
    model_class: type  # the whole model: the interface of model/api.py
    block_class: type  # one decoder layer, built as block_class(config, i)
    names: TensorNames
    gguf_arch: str  # the llama.cpp architecture that runs an export (gguf/layout.py maps its roles)
    hf_architectures: list[str] = field(default_factory=list)  # config.json "architectures"
