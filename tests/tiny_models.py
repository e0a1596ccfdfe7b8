"""Tiny random EMO checkpoints in the released HF layout (two shards + index + tokenizer.json).

Written directly from numpy with the released tensor names, independently of emo's writer.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from emo_cli.model.bpe import save_tokenizer, train_bpe

WORDS = ("the patient was given a dose of aspirin for acute pain in the chest and the doctor "
         "ordered tests def return import class for while if else print value list dict lambda "
         "theorem proof lemma integral sum of squares equals license permission granted warranty "
         "liability copyright holder shall be liable and he said unto them").split()


def sample_texts(n: int, seed: int = 0, words_per_doc=(8, 40)) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        k = rng.randint(*words_per_doc)
        sent = " ".join(rng.choice(WORDS) for _ in range(k))
        docs.append(sent.capitalize() + ". " + str(rng.randint(0, 999)) + "!")
    return docs


@lru_cache(maxsize=1)
def _tokenizer():
    return train_bpe(sample_texts(400, seed=123), vocab_size=320)


VARIANTS = {
    # name: config overrides
    "shared": dict(num_experts=8, num_experts_per_tok=3, num_shared_experts=1),
    "plain": dict(num_experts=6, num_experts_per_tok=2, num_shared_experts=0),
    "plain_norm": dict(num_experts=6, num_experts_per_tok=2, num_shared_experts=0, norm_topk_prob=True),
    "always_active": dict(num_experts=6, num_experts_per_tok=3, num_shared_experts=0, always_active_experts=[2]),
    "gqa": dict(num_experts=8, num_experts_per_tok=3, num_shared_experts=1, num_key_value_heads=2),
    "dense_lead": dict(num_experts=8, num_experts_per_tok=3, num_shared_experts=1,
                       num_experts_per_layer=[0, 8, 8], dense_intermediate_size=48, dense_mlp_bias=True),
    "per_layer": dict(num_experts=8, num_experts_per_tok=3, num_shared_experts=1,
                      num_experts_per_layer=[0, 8, 6], num_shared_experts_per_layer=[0, 1, 1],
                      dense_intermediate_size=40),
}


def tiny_config(variant: str, eos: int, pad: int, vocab: int) -> dict:
    cfg = dict(model_type="emo", architectures=["EmoForCausalLM"], vocab_size=vocab, hidden_size=32,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=None, intermediate_size=16,
               hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
               attention_bias=False, pad_token_id=pad, eos_token_id=eos, bos_token_id=None,
               tie_word_embeddings=False, norm_topk_prob=False, output_router_logits=True)
    cfg.update(VARIANTS[variant])
    return cfg


def write_tiny_model(out_dir: Path, variant: str = "shared", seed: int = 0, extra_rows: int = 3,
                     dtype=np.float32, overrides: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    eos, pad = save_tokenizer(tok, out_dir, model_max_length=256)
    V = tok.get_vocab_size() + extra_rows  # rows beyond the tokenizer are part of the softmax
    cfg = tiny_config(variant, eos, pad, V)
    cfg.update(overrides or {})  # e.g. wider shapes, or a variant without dense biases
    rng = np.random.default_rng(seed)
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    Hkv = cfg["num_key_value_heads"] or H
    hd, F = D // H, cfg["intermediate_size"]

    def rnd(*shape, s=0.2):
        return (rng.standard_normal(shape) * s).astype(dtype)

    shard1, shard2 = {}, {}
    shard1["model.embed_tokens.weight"] = rnd(V, D, s=1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tgt = shard1 if i == 0 else shard2
        tgt[f"{p}.pre_attention_layernorm.weight"] = (1 + rnd(D, s=0.1)).astype(dtype)
        tgt[f"{p}.pre_feedforward_layernorm.weight"] = (1 + rnd(D, s=0.1)).astype(dtype)
        tgt[f"{p}.self_attn.q_proj.weight"] = rnd(H * hd, D)
        tgt[f"{p}.self_attn.k_proj.weight"] = rnd(Hkv * hd, D)
        tgt[f"{p}.self_attn.v_proj.weight"] = rnd(Hkv * hd, D)
        tgt[f"{p}.self_attn.o_proj.weight"] = rnd(D, H * hd)
        per = cfg.get("num_experts_per_layer")
        n = per[i] if per else cfg["num_experts"]
        if n == 0:
            Fd = cfg["dense_intermediate_size"]
            tgt[f"{p}.mlp.gate_proj.weight"] = rnd(Fd, D)
            tgt[f"{p}.mlp.up_proj.weight"] = rnd(Fd, D)
            tgt[f"{p}.mlp.down_proj.weight"] = rnd(D, Fd)
            if cfg.get("dense_mlp_bias"):
                tgt[f"{p}.mlp.gate_proj.bias"] = rnd(Fd)
                tgt[f"{p}.mlp.up_proj.bias"] = rnd(Fd)
                tgt[f"{p}.mlp.down_proj.bias"] = rnd(D)
            continue
        tgt[f"{p}.mlp.gate.weight"] = rnd(n, D, s=0.5)
        for j in range(n):
            tgt[f"{p}.mlp.experts.{j}.gate_proj.weight"] = rnd(F, D, s=0.4)
            tgt[f"{p}.mlp.experts.{j}.up_proj.weight"] = rnd(F, D, s=0.4)
            tgt[f"{p}.mlp.experts.{j}.down_proj.weight"] = rnd(D, F, s=0.4)
    shard2["model.norm.weight"] = (1 + rnd(D, s=0.1)).astype(dtype)
    shard2["lm_head.weight"] = rnd(V, D, s=0.5)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file(shard1, str(out_dir / names[0]), metadata={"format": "pt"})
    save_file(shard2, str(out_dir / names[1]), metadata={"format": "pt"})
    wm = {k: names[0] for k in shard1} | {k: names[1] for k in shard2}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path
