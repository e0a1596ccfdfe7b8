"""`emo prune` of a .gguf model: the experts' bytes are cut from the file as they are.

The identity: pruning a q8_0 (or q4_0) export equals exporting the pruned HF directory at the same
quant, byte for byte in every tensor and key for key in the metadata (but the two keys that name
where a file came from), so the slim file runs with the same logits. Refusals are one line and
leave nothing behind.
"""

import json

import numpy as np
import pytest
import torch
from test_cli import assert_clean_error, run

from emo_cli.gguf import layout as gf
from emo_cli.errors import EmoError
from emo_cli.gguf.export import export_gguf
from emo_cli.experts.slim_gguf import open_source, prune_gguf
from emo_cli.experts.pipeline import run_profile
from emo_cli.runtime import load_model
from emo_cli.experts.selection import Plan

TEXT = "The patient was given a dose of aspirin for acute pain. def return value 77!"
# where each file says it came from: the HF route names the HF directory and its fingerprint
PROVENANCE_OF_FILE = {"emo.source_model", gf.K_EMO_SOURCE_FINGERPRINT}


@pytest.fixture(scope="module")
def src(tmp_path_factory, tiny_model_factory, med_data):
    """The tiny shared-expert model, its profile, and its q8_0 and q4_0 exports."""
    root = tmp_path_factory.mktemp("gguf-prune")
    hf = tiny_model_factory("shared")
    prof = run_profile(load_model(hf), [str(med_data)], seq_len=64, batch_size=4, quiet=True)
    prof.save(root / "med.profile.safetensors")
    ggufs = {q: export_gguf(hf, root / f"full-{q}.gguf", quant=q)["output"] for q in ("q8_0", "q4_0")}
    return {"root": root, "hf": hf, "profile": root / "med.profile.safetensors", **ggufs}


def prune(args, capsys, cwd, monkeypatch):
    code, out, err = run(["prune", *map(str, args), "--json"], capsys, cwd, monkeypatch)
    assert code == 0, err
    return json.loads(out)


def keys(path) -> dict:
    r = gf.open_reader(path)
    return {k: gf.field(r, k) for k in r.fields if not k.startswith("GGUF.")}


def assert_same_tensors(a, b):
    ta, tb = gf.open_reader(a).tensors, gf.open_reader(b).tensors
    assert [t.name for t in ta] == [t.name for t in tb]
    for x, y in zip(ta, tb):
        assert x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape), x.name
        assert np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes(), x.name


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_pruning_a_gguf_equals_exporting_the_pruned_hf_dir(src, quant, tmp_path, capsys, monkeypatch):
    # the HF route: slim directory + its export at the same quant (with its model card, as users get it)
    hf_rep = prune(["--model", src["hf"], "-p", src["profile"], "--budget", "5", "--quant", quant, "-o", "slim"],
                   capsys, tmp_path, monkeypatch)
    ref = tmp_path / "slim.gguf"
    assert hf_rep["gguf"]["path"] == "slim.gguf" and hf_rep["gguf"]["quant"] == quant
    # the GGUF route, from the same profile (made on the HF model the file was exported from) ...
    (tmp_path / "g").mkdir()
    rep = prune(["--model", src[quant], "-p", src["profile"], "--budget", "5", "--gguf", "g/slim.gguf"],
                capsys, tmp_path, monkeypatch)
    cut = tmp_path / "g" / "slim.gguf"
    assert rep["gguf"] == {"path": "g/slim.gguf", "quant": quant, "bytes": cut.stat().st_size}
    assert rep["kept_per_layer"] == hf_rep["kept_per_layer"] == {"0": 5, "1": 5, "2": 5}
    assert_same_tensors(cut, ref)
    a, b = keys(cut), keys(ref)
    assert [k for k in a if k not in PROVENANCE_OF_FILE] == [k for k in b if k not in PROVENANCE_OF_FILE]
    assert {k: v for k, v in a.items() if k not in PROVENANCE_OF_FILE} == \
        {k: v for k, v in b.items() if k not in PROVENANCE_OF_FILE}
    assert a["emo.source_model"] == str(src[quant]) and gf.K_EMO_SOURCE_FINGERPRINT not in a
    assert a[gf.K_EXPERTS] == 4 and a[gf.K_EXPERTS_USED] == 2 and a["general.size_label"] == b["general.size_label"]
    kept = json.loads((tmp_path / "slim" / "pruning_metadata.json").read_text())["experts_kept_per_layer"]
    assert json.loads(a["emo.experts_kept_per_layer"]) == kept
    # ... and from the saved plan: the same file, but for the name it takes from its own
    rep = prune(["--model", src[quant], "-p", src["profile"], "--plan", "slim/plan.json", "-o", "again"],
                capsys, tmp_path, monkeypatch)
    assert rep["output"] == "again.gguf"
    assert_same_tensors(tmp_path / "again.gguf", cut)
    again = keys(tmp_path / "again.gguf")
    assert again.pop("general.name") == "Again" and a.pop("general.name") == "Slim" and again == a
    assert sorted(p.name for p in tmp_path.iterdir()) == [".emo", "again.gguf", "g", "slim", "slim.gguf"]
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["slim.gguf"]  # no staging file left


def test_slim_gguf_runs_with_the_logits_of_the_exported_slim_model(src, tmp_path, capsys, monkeypatch):
    prune(["--model", src["hf"], "-p", src["profile"], "--budget", "4", "--quant", "q8_0", "-o", "slim"],
          capsys, tmp_path, monkeypatch)
    prune(["--model", src["q8_0"], "-p", src["profile"], "--plan", "slim/plan.json", "--gguf", "cut.gguf"],
          capsys, tmp_path, monkeypatch)
    cut, ref = load_model(tmp_path / "cut.gguf"), load_model(tmp_path / "slim.gguf")
    assert cut.config.num_experts == 4 and cut.config.num_experts_per_tok == 3
    ids = torch.tensor([cut.tokenizer.encode(TEXT)])
    with torch.no_grad():
        logits = cut.model(ids)
        assert torch.equal(logits, ref.model(ids))
        # the full file with routing masked to the plan: the slim model's numbers (up to rounding)
        full = load_model(src["q8_0"])
        full.model.set_expert_mask(Plan.load(tmp_path / "slim" / "plan.json").kept)
        masked = full.model(ids)
    assert float((logits - masked).abs().max() / masked.abs().max()) < 1e-4
    assert cut.model.expert_ids() == json.loads(keys(tmp_path / "cut.gguf")["emo.experts_kept_per_layer"])


def test_llama_cpp_runs_the_slim_gguf(src, tmp_path, capsys, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp")
    prune(["--model", src["hf"], "-p", src["profile"], "--budget", "5", "--quant", "q8_0", "-o", "slim"],
          capsys, tmp_path, monkeypatch)
    prune(["--model", src["q8_0"], "-p", src["profile"], "--plan", "slim/plan.json", "--gguf", "cut.gguf"],
          capsys, tmp_path, monkeypatch)
    scores = []
    for path in (tmp_path / "cut.gguf", tmp_path / "slim.gguf"):
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=1, verbose=False)
        try:
            ids = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
            llm.eval(ids)
            scores.append(np.array(llm.scores[:len(ids)]))
        finally:
            llm.close()
    assert np.isfinite(scores[0]).all() and np.array_equal(scores[0], scores[1])


def test_profile_of_the_gguf_and_a_pruned_source(src, med_data, tmp_path, capsys, monkeypatch):
    """A profile made on the GGUF itself, a held-out report from the GGUF model, and a pruned GGUF
    as the source: its experts are found by their original ids, so cutting twice = cutting once."""
    lm = load_model(src["q8_0"])
    prof = run_profile(lm, [str(med_data)], seq_len=64, batch_size=4, quiet=True)
    prof.save(tmp_path / "g.profile.safetensors")
    rep = prune(["--model", src["q8_0"], "-p", "g.profile.safetensors", "--budget", "6", "--method", "router"],
                capsys, tmp_path, monkeypatch)
    assert rep["output"] == "slim-g.gguf" and rep["eval"]["heldout"]["docs"] > 0
    assert rep["bytes_after"] < rep["bytes_before"]
    once = open_source(tmp_path / "slim-g.gguf")
    assert once.fingerprints == (once.fingerprint,)  # no HF directory behind it
    six = once.expert_ids
    smaller = {i: sorted(ids[1:3] + [ids[-1]]) for i, ids in enumerate(six)}  # 2 routed + shared
    twice = prune_gguf(once, Plan(smaller, "frequency", "3", "uniform", once.fingerprint), tmp_path / "twice.gguf")
    direct = prune_gguf(src["q8_0"], Plan(smaller, "frequency", "3", "uniform", lm.fingerprint),
                        tmp_path / "direct.gguf")
    assert twice["experts_kept_per_layer"] == direct["experts_kept_per_layer"] == [smaller[i] for i in range(3)]
    assert_same_tensors(tmp_path / "twice.gguf", tmp_path / "direct.gguf")
    assert keys(tmp_path / "twice.gguf")[gf.K_EXPERTS_USED] == 2  # top-3 over 3 kept, shared excluded


def test_refusals_are_one_line_and_write_nothing(src, tiny_model_factory, tmp_path, capsys, monkeypatch):
    base = ["prune", "--model", src["q8_0"], "-p", src["profile"], "--budget", "5"]
    other = export_gguf(tiny_model_factory("shared", seed=1), tmp_path / "other.gguf", quant="q8_0")["output"]

    def refused(args, needle):
        code, _, err = run(args, capsys, tmp_path, monkeypatch)
        assert_clean_error(code, err, needle)

    refused(["prune", "--model", other, "-p", src["profile"]], "the profile was made on another model")
    Plan({i: [0, 1, 2, 3, 7] for i in range(3)}, "frequency", "5", "uniform", "0123456789abcdef").save(
        tmp_path / "plan.json")
    refused([*base, "--plan", "plan.json"], "was made for another model")
    refused([*base, "--quant", "q4_0"], "without re-quantizing")
    refused([*base, "--no-gguf"], "writes only a GGUF")
    refused([*base, "--gguf", src["q8_0"], "--force"], "is the model being pruned")
    uneven = {0: [0, 1, 2, 7], 1: [0, 1, 2, 3, 7], 2: [0, 1, 2, 3, 7]}  # what --allocation global may give
    Plan(uneven, "frequency", "5", "global", open_source(src["q8_0"]).exported_from).save(tmp_path / "uneven.json")
    refused([*base, "--plan", "uneven.json"], "--allocation uniform")
    (tmp_path / "notes.gguf").write_text("my notes")
    refused([*base, "--gguf", "notes.gguf", "--force"], "not an emo output")
    assert (tmp_path / "notes.gguf").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "other.gguf", "plan.json", "uneven.json"]
    prune([*base[1:], "-o", "slim"], capsys, tmp_path, monkeypatch)
    before = (tmp_path / "slim.gguf").read_bytes()
    refused([*base, "-o", "slim", "--budget", "4"], "--force")
    assert (tmp_path / "slim.gguf").read_bytes() == before
    prune([*base[1:], "-o", "slim", "--budget", "4", "--force"], capsys, tmp_path, monkeypatch)
    assert gf.field(gf.open_reader(tmp_path / "slim.gguf"), gf.K_EXPERTS) == 3
    with pytest.raises(EmoError, match="drops the shared expert"):
        prune_gguf(src["q8_0"], Plan({i: [0, 1, 2, 3] for i in range(3)}, "frequency", "4", "uniform",
                                     open_source(src["q8_0"]).fingerprint), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_dry_run_reports_the_slim_size(src, tmp_path, capsys, monkeypatch):
    rep = prune(["--model", src["q4_0"], "-p", src["profile"], "--budget", "4", "--dry-run"],
                capsys, tmp_path, monkeypatch)
    assert rep["dry_run"] and rep["output"] == "slim-med.gguf" and not (tmp_path / "slim-med.gguf").exists()
    stacks = sum(int(t.n_bytes) for t in gf.open_reader(src["q4_0"]).tensors
                 if t.name.endswith(("_exps.weight", "ffn_gate_inp.weight")))
    assert rep["bytes_before"] - rep["bytes_after"] == stacks * 4 // 7  # 3 of 7 routed experts kept


@pytest.mark.parametrize("variant", ["plain", "dense_lead"])
def test_no_shared_expert_and_leading_dense_layers(variant, tmp_path):
    """A model without a shared expert (zero shexp in the file) and one with a leading dense layer:
    the cut file still equals the export of prune_to_dir's directory, tensor for tensor."""
    from tiny_models import write_tiny_model

    from emo_cli.model.loading import open_hf_dir
    from emo_cli.experts.slim_hf import prune_to_dir

    hf = write_tiny_model(tmp_path / "m", variant, overrides={"dense_mlp_bias": False})
    files = open_hf_dir(hf)
    cfg = files.config
    kept = {i: [1, 3, 4] + ([cfg.layer_experts(i) - 1] if cfg.layer_shared(i) else []) for i in cfg.moe_layers()}
    plan = Plan(kept, "frequency", str(len(kept[cfg.moe_layers()[0]])), "uniform", files.fingerprint)
    export_gguf(prune_to_dir(hf, plan, tmp_path / "slim"), tmp_path / "ref.gguf", quant="f16")
    full = export_gguf(hf, tmp_path / "full.gguf", quant="f16")["output"]
    res = prune_gguf(full, plan, tmp_path / "cut.gguf")
    assert res["quant"] == "f16" and res["experts_kept_per_layer"][0] == (None if variant == "dense_lead" else kept[0])
    assert_same_tensors(tmp_path / "cut.gguf", tmp_path / "ref.gguf")
    a, b = keys(tmp_path / "cut.gguf"), keys(tmp_path / "ref.gguf")
    for k in set(a) | set(b):  # the general.* keys come from the model card, which prune_to_dir alone does not write
        if not k.startswith("general.") and k not in PROVENANCE_OF_FILE:
            assert a.get(k) == b.get(k), k


@pytest.mark.parametrize("source", ["hf", "q8_0"])
def test_one_prune_opens_its_model_once(src, source, tmp_path, capsys, monkeypatch, model_opens):
    """The command opens the model once and hands that handle down: planning, the held-out report
    (which loads the model), the size estimate and the writers all take it."""
    from pathlib import Path

    out = ["-o", tmp_path / "slim"] if source == "hf" else ["--gguf", tmp_path / "slim.gguf"]
    report = prune(["--model", src[source], "-p", src["profile"], "--budget", "5", *out], capsys, tmp_path, monkeypatch)
    assert "heldout" in report["eval"]  # the model was loaded, not only opened
    assert model_opens[Path(src[source]).resolve()] == 1, model_opens
