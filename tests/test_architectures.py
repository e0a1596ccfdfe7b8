"""The architecture seam: an architecture whose checkpoints name every tensor differently is one
`Architecture` in the registry, and loading (resident and streamed), slicing, GGUF export and
merging back all follow its table. Its numbers must equal the EMO model it was written from."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors import safe_open

from emo_cli.arch.emo import ARCH, EmoConfig
from emo_cli.arch.registry import ARCHITECTURES, architecture
from emo_cli.arch.spec import TensorNames
from emo_cli.errors import EmoError
from emo_cli.experts.merge_back import merge_back
from emo_cli.experts.selection import Plan
from emo_cli.experts.slim_hf import expected_size, prune_to_dir
from emo_cli.gguf.export import export_gguf
from emo_cli.model.loading import load_hf_model, open_hf_dir, save_hf_model
from emo_cli.runtime import load_model


@dataclass
class RenamedConfig(EmoConfig):
    model_type: str = "emo_renamed"


RENAMED_NAMES = TensorNames(
    embed="tok_embeddings.weight", final_norm="final_norm.weight", lm_head="output.weight",
    layer="blocks.{i}.", router="moe.router.weight", expert="moe.experts.e{j}.{proj}",
    expert_projs={"w_gate": "w1", "w_up": "w3", "w_down": "w2"},
    attention={"attn_norm": "pre_attention_layernorm.weight", "q": "self_attn.q_proj.weight",
               "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
               "ffn_norm": "pre_feedforward_layernorm.weight"},
    dense={"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"},
)
RENAMED = dataclasses.replace(ARCH, model_type="emo_renamed", config_class=RenamedConfig, names=RENAMED_NAMES,
                              hf_architectures=["RenamedForCausalLM"])


@pytest.fixture
def renamed(tmp_path, tiny_model_factory, monkeypatch):
    """(the EMO tiny model's dir, the same weights written under the renamed architecture)."""
    monkeypatch.setitem(ARCHITECTURES, RENAMED.model_type, RENAMED)
    src = tiny_model_factory("shared")
    model, _ = load_hf_model(src)
    model.config = RenamedConfig(**{f.name: getattr(model.config, f.name) for f in dataclasses.fields(EmoConfig)
                                    if f.name != "model_type"})
    save_hf_model(model, tmp_path / "renamed", tokenizer_dir=src)
    return src, tmp_path / "renamed"


def tensor_names(d) -> set[str]:
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_unknown_model_type_is_one_clear_error():
    with pytest.raises(EmoError, match="unsupported model_type 'olmoe'.*'emo'"):
        architecture("olmoe")


def test_names_parse_what_they_format():
    n = RENAMED_NAMES
    assert n.parse(n.expert_of(3, 12, "w3")) == n.parse("blocks.3.moe.experts.e12.w3")
    ref = n.parse("blocks.3.moe.experts.e12.w3")
    assert (ref.layer, ref.expert, ref.proj, ref.router) == (3, 12, "w3", False)
    assert n.parse(n.router_of(5)).router and n.parse(n.router_of(5)).layer == 5
    assert n.parse("blocks.7.self_attn.q_proj.weight").layer == 7
    assert n.parse("output.weight").layer is None
    assert n.renumbered("blocks.3.moe.experts.e12.w2", 4) == "blocks.3.moe.experts.e4.w2"


@torch.no_grad()
def test_a_renamed_architecture_loads_streams_slices_exports_and_merges(renamed, tmp_path):
    src, alt = renamed
    names = tensor_names(alt)
    assert "blocks.1.moe.experts.e7.w2" in names and "tok_embeddings.weight" in names
    assert not any(n.startswith("model.") or ".mlp.experts." in n for n in names)  # nothing under EMO's names

    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 64, 21]])
    ref, _ = load_hf_model(src)
    want = ref(ids)
    got, files = load_hf_model(alt)
    assert files.arch is RENAMED and isinstance(files.config, RenamedConfig)
    assert torch.equal(got(ids), want)
    streamed = load_model(alt, streaming="on").model
    assert torch.allclose(streamed.logits(streamed.run_layers(streamed.embed(ids), 0, streamed.num_layers)), want, atol=1e-5, rtol=0)

    # slicing: the same plan on both gives the same slim model, sizes from the headers alike
    rng = random.Random(1)
    kept = {i: sorted(rng.sample(range(7), 3)) + [7] for i in range(ref.config.num_hidden_layers)}
    plans = {d: Plan(kept, "random", "4", "uniform", open_hf_dir(d).fingerprint) for d in (src, alt)}
    slim_ref = prune_to_dir(src, plans[src], tmp_path / "slim-ref")
    slim_alt = prune_to_dir(alt, plans[alt], tmp_path / "slim-alt")
    assert expected_size(alt, plans[alt]) == expected_size(src, plans[src])
    assert "blocks.0.moe.experts.e3.w1" in tensor_names(slim_alt)
    assert torch.equal(load_hf_model(slim_alt)[0](ids), load_hf_model(slim_ref)[0](ids))

    # GGUF: the same llama.cpp tensors, byte for byte
    def gguf_tensors(d, name):
        export_gguf(d, tmp_path / name, quant="f32")
        return {t.name: np.array(t.data) for t in GGUFReader(tmp_path / name).tensors}

    a, b = gguf_tensors(slim_ref, "ref.gguf"), gguf_tensors(slim_alt, "alt.gguf")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    # merging the slim experts back gives the full model again, under the renamed names
    merge_back(slim_alt, alt, tmp_path / "merged")
    assert tensor_names(tmp_path / "merged") == names
    assert torch.equal(load_hf_model(tmp_path / "merged")[0](ids), want)
