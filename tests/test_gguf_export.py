"""GGUF export, with llama.cpp (llama-cpp-python) as the real client.

Exact at f32: llama.cpp's logits equal emo's runtime (and, for a pruned model, the independent
float64 reference of the masked full model) and greedy continuations are identical. Quantized
files are real (small) and agree with f32 on the next token. Refused models leave no file.
"""

import json
import random
import sys
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import reference_emo
from emo_cli.gguf import layout as gf
from emo_cli.cli.app import app, main
from emo_cli.errors import EmoError
from emo_cli.gguf.export import export_gguf, gguf_blocker
from emo_cli.gguf.layout import open_reader
from emo_cli.info import gguf_info, hf_info
from emo_cli.model.loading import load_hf_model, open_hf_dir, save_hf_model
from emo_cli.experts.slim_hf import prune_to_dir
from emo_cli.runtime import load_model
from emo_cli.experts.selection import Plan
from tiny_models import sample_texts, write_tiny_model

PROMPT = "The patient was given a dose of aspirin. def return 42! theorem proof"
EXACT_VARIANTS = ["shared", "plain", "gqa", "dense_lead", "pruned"]
FACT_KEYS = ("layers", "hidden_size", "heads", "kv_heads", "vocab_size", "top_k", "experts_per_layer",
             "params_total", "params_active", "params_active_no_embed")


@contextmanager
def llama(path, n_ctx=256):
    llama_cpp = pytest.importorskip("llama_cpp")  # the [llama] extra
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=1, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)  # [S, V]


def llama_greedy(llm, ids, n) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@torch.no_grad()
def emo_greedy(model, ids, n) -> list[int]:
    cache = model.new_cache()
    logits = model(torch.tensor([ids]), cache=cache)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache=cache)
    return out


def rel_err(a, ref) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def make_pruned(src, out_dir):
    """A shared-expert model sliced by emo's own pruner to 5 of 8 experts per layer (shared kept)."""
    files = open_hf_dir(src)
    rng = random.Random(3)
    kept = {i: sorted(rng.sample(range(7), 4)) + [7] for i in range(files.config.num_hidden_layers)}
    plan = Plan(kept=kept, method="random", budget="5", allocation="uniform", model_fingerprint=files.fingerprint,
                extra={"profile_fingerprint": "feedc0de"})
    return prune_to_dir(src, plan, out_dir), plan


@pytest.fixture(scope="module")
def exact(tmp_path_factory, tiny_model_factory):
    """variant -> (HF dir, f32 GGUF, plan or None); dense_lead here has no MLP biases (llama.cpp has none)."""
    root = tmp_path_factory.mktemp("gguf")
    dirs, plans = {v: tiny_model_factory(v) for v in ("shared", "plain", "gqa")}, {}
    dirs["dense_lead"] = write_tiny_model(root / "dense_lead", "dense_lead", overrides={"dense_mlp_bias": False})
    dirs["pruned"], plans["pruned"] = make_pruned(dirs["shared"], root / "pruned")
    out = {}
    for v, d in dirs.items():
        r = export_gguf(d, root / f"{v}.gguf", quant="f32")
        out[v] = (d, root / f"{v}.gguf", plans.get(v), r)
    return out


@pytest.mark.parametrize("variant", EXACT_VARIANTS)
def test_f32_llama_cpp_equals_emo_runtime(exact, variant):
    d, path, plan, _ = exact[variant]
    lm = load_model(d)
    ids = lm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]))[0].double().numpy()
    with llama(path) as llm:
        assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids  # 'dbrx' pre-tokenizer
        theirs = llama_logits(llm, ids)
        assert rel_err(theirs, ours) < 2e-3
        assert llama_greedy(llm, ids, 16) == emo_greedy(lm.model, ids, 16)


def test_pruned_export_equals_float64_masked_full_model(exact, tiny_model_factory):
    _, path, plan, _ = exact["pruned"]
    full = tiny_model_factory("shared")
    cfg, T = reference_emo.load_tensors(full)
    ids = load_model(full).tokenizer.encode(PROMPT)
    ref = reference_emo.forward(cfg, T, ids, keep=plan.kept)
    with llama(path) as llm:
        assert rel_err(llama_logits(llm, ids), ref) < 2e-3
    reader = open_reader(path)
    assert gf.field(reader, gf.K_EXPERTS) == 4 and gf.field(reader, gf.K_EXPERTS_USED) == 2  # 5 kept, top-3


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_pruned_tiny_quantized_exports_load(exact, tmp_path, quant):
    d, _, _, _ = exact["pruned"]
    r = export_gguf(d, tmp_path / f"p-{quant}.gguf", quant=quant)
    ids = load_model(d).tokenizer.encode(PROMPT)
    with llama(r["output"]) as llm:
        assert np.isfinite(llama_logits(llm, ids)).all()
    assert gguf_info(r["output"])["quant"] == quant
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"p-{quant}.gguf"]  # intermediates removed


@pytest.mark.parametrize("variant", EXACT_VARIANTS)
def test_info_of_gguf_reports_the_hf_facts(exact, variant):
    d, path, plan, r = exact[variant]
    hf, gg = hf_info(d), gguf_info(path)
    assert {k: gg[k] for k in FACT_KEYS} == {k: hf[k] for k in FACT_KEYS}
    assert gg["format"] == "gguf" and gg["quant"] == "f32" and gg["bytes"] == r["bytes"]
    if plan is None:
        assert "pruning" not in gg
    else:
        for name in ("original_model", "experts_kept_per_layer", "pruning_method", "budget", "profile_fingerprint"):
            assert gg["pruning"][name] == hf["pruning"][name]


def test_gguf_config_round_trip(exact):
    for variant in EXACT_VARIANTS:
        d, path, _, _ = exact[variant]
        src = open_hf_dir(d).config
        cfg = gf.config_from_gguf(open_reader(path))
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "num_experts_per_tok", "rms_norm_eps", "rope_theta", "pad_token_id"):
            assert getattr(cfg, name) == getattr(src, name), (variant, name)
        assert cfg.kv_heads == src.kv_heads and cfg.eos_ids == src.eos_ids
        assert [cfg.layer_experts(i) for i in range(3)] == [src.layer_experts(i) for i in range(3)]
        assert [cfg.layer_shared(i) for i in range(3)] == [src.layer_shared(i) for i in range(3)]


def test_tokenizer_keys(exact):
    d, path, _, _ = exact["shared"]
    reader = open_reader(path)
    tokens = gf.field(reader, "tokenizer.ggml.tokens")
    types = gf.field(reader, "tokenizer.ggml.token_type")
    tj = json.loads((d / "tokenizer.json").read_text())
    n_tok = len(tj["model"]["vocab"])
    cfg = open_hf_dir(d).config
    assert len(tokens) == len(types) == cfg.vocab_size > n_tok  # padded to the embedding rows
    assert all(types[i] == 5 for i in range(n_tok, cfg.vocab_size))  # unused
    assert types[cfg.eos_token_id] == 3 and tokens[cfg.eos_token_id] == "<|endoftext|>"  # control
    assert gf.field(reader, "tokenizer.ggml.pre") == "dbrx" and gf.field(reader, "tokenizer.ggml.add_bos_token") is False
    assert len(gf.field(reader, "tokenizer.ggml.merges")) == len(tj["model"]["merges"])


def test_qk_permutation_round_trips():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    p = gf.permute_qk(w, 8)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(gf.unpermute_qk(p, 8), w)
    # row 2i of a head is NeoX row i, row 2i+1 is NeoX row i + hd/2
    np.testing.assert_array_equal(p[16 + 2 * 3], w[16 + 3])
    np.testing.assert_array_equal(p[16 + 2 * 3 + 1], w[16 + 3 + 8])


# ---- quantization ------------------------------------------------------------------------------
def write_smooth_model(d):
    """A wider (D = F = 256, K-quant blocks fit) random model whose next-token choices are stable.

    Tiny random models are chaotic: at the default weight scales even f16 flips a few top-1
    tokens, so top-1 agreement would measure the chaos, not the quantizer. Here the layers' weights
    are scaled by 0.1 (they still move the residual stream by ~30% and change the top-1 at about a
    third of the positions, checked below) and the output head gets a bigram component (row v
    partly = embedding of token v-1), so that predictions have margins as a trained model's do.
    """
    write_tiny_model(d, "shared", seed=0, overrides=dict(hidden_size=256, intermediate_size=256,
                                                         num_hidden_layers=2, max_position_embeddings=512))
    embed = None
    for f in sorted(d.glob("*.safetensors")):
        T = load_file(str(f))
        embed = T.get("model.embed_tokens.weight", embed)
        for k, v in T.items():
            if v.ndim == 2 and not k.endswith(("embed_tokens.weight", "mlp.gate.weight", "lm_head.weight")):
                T[k] = v * np.float32(0.1)
        if "lm_head.weight" in T:
            T["lm_head.weight"] = T["lm_head.weight"] + np.float32(0.1) * np.roll(embed, 1, axis=0)
        save_file(T, str(f), metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    root = tmp_path_factory.mktemp("smooth")
    d = write_smooth_model(root / "model")
    return d, {q: export_gguf(d, root / f"m-{q}.gguf", quant=q) for q in ("f32", "q8_0", "q4_k_m")}


def test_smooth_model_layers_matter(smooth):
    d, _ = smooth
    lm = load_model(d)
    ids = torch.tensor([lm.tokenizer.encode(" ".join(sample_texts(6, seed=99)))])
    with torch.no_grad():
        full = lm.model(ids)[0].argmax(-1)
        embed_only = lm.model.logits(lm.model.embed(ids))[0].argmax(-1)
    assert (full != embed_only).float().mean() > 0.2


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_is_small_and_agrees_on_top1(smooth, quant):
    d, results = smooth
    r, f32 = results[quant], results["f32"]
    assert r["bytes"] < 0.6 * f32["bytes"] and abs(r["ratio"] - r["bytes"] / f32["bytes"]) < 0.01
    text = " ".join(sample_texts(6, seed=99))  # the tokenizer was trained on seed 123
    with llama(f32["output"], n_ctx=512) as llm:
        ids = llm.tokenize(text.encode(), add_bos=False)
        ref = llama_logits(llm, ids)
    with llama(r["output"], n_ctx=512) as llm:
        q = llama_logits(llm, ids)
    assert len(ids) > 200 and np.isfinite(q).all()
    assert (q.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    types = {t.name: t.tensor_type.name for t in open_reader(r["output"]).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.ffn_norm.weight"] == "F32"
    want = {"q8_0": {"Q8_0"}, "q4_k_m": {"Q4_K", "Q5_K", "Q6_K"}}[quant]
    assert types["blk.1.ffn_gate_exps.weight"] in want and types["token_embd.weight"] in want


def test_export_streams_tensor_by_tensor(smooth, tmp_path):
    """Python-side peak memory of an export stays far below the model (one stacked tensor or so)."""
    d, results = smooth
    tracemalloc.start()
    try:
        export_gguf(d, tmp_path / "x.gguf", quant="f32")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.35 * results["f32"]["bytes"]


def test_bf16_source_k_quant(tmp_path, tiny_model_factory):
    model, _ = load_hf_model(tiny_model_factory("gqa"))
    src = tmp_path / "bf16"
    save_hf_model(model, src, dtype=torch.bfloat16, tokenizer_dir=tiny_model_factory("gqa"))
    r = export_gguf(src, tmp_path / "x.gguf", quant="q6_k")
    types = {t.name: t.tensor_type.name for t in open_reader(r["output"]).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_q.weight"] == "Q8_0"
    with llama(r["output"]) as llm:
        assert np.isfinite(llama_logits(llm, llm.tokenize(PROMPT.encode(), add_bos=False))).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "x.gguf"]


# ---- refusals ------------------------------------------------------------------------------------
REFUSED = {
    "per_layer": ({}, "--allocation uniform"),
    "always_active": ({}, "always-active"),
    "dense_lead": ({}, "dense MLP layers have biases"),
    "plain_norm": ({}, "norm_topk_prob"),
    "shared": ({"num_experts_per_layer": [8, 0, 8], "dense_intermediate_size": 48}, "comes after MoE layer"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_models_leave_no_file(tmp_path, case):
    overrides, phrase = REFUSED[case]
    d = write_tiny_model(tmp_path / "m", case, overrides=overrides)
    assert phrase in gguf_blocker(open_hf_dir(d).config, d)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(EmoError, match="cannot be exported to GGUF exactly") as e:
        export_gguf(d, out_dir / "x.gguf", quant="q4_k_m")
    assert phrase in str(e.value) and "\n" not in str(e.value)
    assert list(out_dir.iterdir()) == []


def test_unrecognised_pre_tokenizer_is_refused(tmp_path, tiny_model_factory):
    d = tmp_path / "m"
    model, _ = load_hf_model(tiny_model_factory("shared"))
    save_hf_model(model, d, tokenizer_dir=tiny_model_factory("shared"))
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(EmoError, match="unrecognised tokenizer pre-tokenization"):
        export_gguf(d, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_existing_output_needs_force(exact, tmp_path):
    d = exact["shared"][0]
    out = tmp_path / "x.gguf"
    out.write_bytes(b"user data")
    with pytest.raises(EmoError, match="already exists"):
        export_gguf(d, out)
    assert out.read_bytes() == b"user data"
    export_gguf(d, out, force=True)
    assert gguf_info(out)["quant"] == "f16"


def test_failed_llama_quantize_leaves_no_file(exact, tmp_path, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp")  # K-quants go through llama.cpp's quantizer
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *a: 1)  # llama.cpp reporting failure
    with pytest.raises(EmoError, match="could not quantize"):
        export_gguf(exact["shared"][0], tmp_path / "x.gguf", quant="q4_k_m")
    assert list(tmp_path.iterdir()) == []


# ---- command line ------------------------------------------------------------------------------
def test_cli_export_then_info(exact, tmp_path):
    d, _, _, _ = exact["pruned"]
    out = tmp_path / "slim.gguf"
    res = CliRunner().invoke(app, ["export", str(d), "-o", str(out), "--quant", "q8_0", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["output"] == str(out) and summary["quant"] == "q8_0" and out.exists()
    res = CliRunner().invoke(app, ["info", str(out), "--json"])
    facts = json.loads(res.stdout)
    hf = hf_info(d)
    assert {k: facts[k] for k in FACT_KEYS} == {k: hf[k] for k in FACT_KEYS}
    assert facts["quant"] == "q8_0" and facts["pruning"]["experts_kept_per_layer"] == hf["pruning"]["experts_kept_per_layer"]
    res = CliRunner().invoke(app, ["export", str(d), "-o", str(tmp_path / "t.gguf")])
    assert res.exit_code == 0 and "emo export" in res.stdout and "f16" in res.stdout
    assert gguf_info(tmp_path / "t.gguf")["quant"] == "f16"


def test_cli_refusal_is_one_line(tmp_path, monkeypatch, capsys):
    d = write_tiny_model(tmp_path / "m", "per_layer")
    monkeypatch.setattr(sys, "argv", ["emo", "export", str(d), "-o", str(tmp_path / "x.gguf")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--allocation uniform" in err
    assert not (tmp_path / "x.gguf").exists()
