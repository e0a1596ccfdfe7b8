"""emo finetune: which tokens train, numbers against the float64 reference, checkpoint 0, resume,
freeze modes, provenance, and the CLI's one-line refusals."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_emo import doc_nll, forward, load_tensors
from safetensors.torch import load_file
from tiny_models import sample_texts, write_jsonl

from emo_cli.data.documents import Document, read_documents
from emo_cli.errors import EmoError
from emo_cli.training.finetune import (FinetuneSettings, Window, encode_example, finetune, heldout_loss, memory_help,
                              output_spans, train_step, trains, windows)
from emo_cli.model.loading import load_hf_model
from emo_cli.data.mc_items import MCItem
from emo_cli.model.tokenizer import EmoTokenizer
from emo_cli.training.shared import balance_loss

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "user", "content": "what is J45?"}, {"role": "assistant", "content": "asthma, unspecified"},
        {"role": "user", "content": "and I10?"}, {"role": "assistant", "content": "essential hypertension"}]


def target_text(tok, doc, template=None):
    text, spans = output_spans(doc, template, "")
    ids, target = encode_example(tok, text, spans)
    return tok.decode([i for i, t in zip(ids, target) if t and i != tok.eos_id]), ids, target


def test_chat_rows_train_on_assistant_turns_only(tiny_model_factory):
    tok = EmoTokenizer.from_dir(tiny_model_factory("shared"))
    doc = Document("", "x", 0, messages=CHAT)
    got, ids, target = target_text(tok, doc)
    assert got.replace(" ", "") == "asthma,unspecifiedessentialhypertension"
    assert ids[-1] == tok.eos_id and target[-1]  # the answer ends the row: EOS is learned
    got, _, _ = target_text(tok, doc, TEMPLATE)  # with a chat template: the rendered reply, its closing tag too
    assert "asthma, unspecified</assistant>" in got and "essential hypertension</assistant>" in got
    assert "J45" not in got and "<user>" not in got


def test_multiple_choice_rows_train_on_the_answer_and_text_on_everything(tiny_model_factory):
    tok = EmoTokenizer.from_dir(tiny_model_factory("shared"))
    item = MCItem("Q: the patient was given? A:", ["aspirin", "a dose"], 0, prefix="Q: pain? A: acute\n\n")
    got, _, _ = target_text(tok, Document(item.solved, "x", 0, item))
    assert got.strip() == "aspirin"
    got, ids, target = target_text(tok, Document("the doctor gave aspirin", "x", 0))
    assert all(target) and got == "the doctor gave aspirin"


def test_windows_cover_every_target_once():
    ids, target = list(range(10)), [False, False, True, True, False, True, True, True, False, True]
    ws = windows(ids, target, 4)
    assert [w.ids for w in ws] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    predicted = [w.ids[i] for w in ws for i in range(1, len(w.ids)) if w.target[i]]
    assert predicted == [i for i in range(1, 10) if target[i]]
    assert windows([1, 2, 3], [True, False, False], 8) == []  # nothing to predict: dropped


def reference_target_nll(cfg, T, wins: list[Window]) -> tuple[float, int]:
    """(mean NLL over the target tokens, their count) by the float64 reference model."""
    total, count = 0.0, 0
    for w in wins:
        logits = forward(cfg, T, w.ids)
        for t in range(len(w.ids) - 1):
            if w.target[t + 1]:
                z = logits[t] - logits[t].max()
                total += -(z[w.ids[t + 1]] - math.log(np.exp(z).sum()))
                count += 1
    return total / count, count


def test_heldout_loss_equals_float64_reference(tiny_model_factory):
    path = tiny_model_factory("shared")
    cfg, T = load_tensors(path)
    model, _ = load_hf_model(path, dtype=torch.float32)
    rng = np.random.default_rng(0)
    wins = [Window(rng.integers(0, 300, n).tolist(), (rng.random(n) < 0.6).tolist()) for n in (9, 14, 5)]
    got = heldout_loss(model, wins, pad_id=0, micro_batch=2, device="cpu", precision="fp32")
    ref, count = reference_target_nll(cfg, T, wins)
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(ref, abs=2e-5)
    all_targets = [Window(w.ids, [True] * len(w.ids)) for w in wins[:1]]  # every token: the LM loss
    ref = doc_nll(cfg, T, wins[0].ids) / (len(wins[0].ids) - 1)
    assert heldout_loss(model, all_targets, 0, 1, "cpu", "fp32")["loss"] == pytest.approx(ref, abs=2e-5)


def test_gradient_is_the_mean_over_the_step_target_tokens(tiny_model_factory):
    """Accumulating micro-batches gives the gradient of the mean NLL over all target tokens of the
    step: checked on the final norm (routing does not depend on it) by central differences of the
    float64 reference."""
    path = tiny_model_factory("shared")
    cfg, T = load_tensors(path)
    rng = np.random.default_rng(1)
    batch = [Window(rng.integers(0, 300, n).tolist(), [True] * n if n < 8 else (rng.random(n) < 0.5).tolist())
             for n in (12, 6, 9)]

    def ref_loss(Tm):
        return reference_target_nll(cfg, Tm, batch)[0]

    model, _ = load_hf_model(path, dtype=torch.float32)
    model.requires_grad_(True)  # loaded for inference
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    s = FinetuneSettings(batch_size=3, micro_batch=2, grad_clip=0.0)
    loss, _ = train_step(model, opt, batch, 0, s, lb_weight=0.0, device="cpu", precision="fp32")
    assert loss == pytest.approx(ref_loss(T), abs=2e-5)
    grad = model.norm.weight.grad
    for j in (0, 7, 31):
        h, plus, minus = 1e-5, dict(T), dict(T)
        plus["model.norm.weight"] = T["model.norm.weight"].copy()
        plus["model.norm.weight"][j] += h
        minus["model.norm.weight"] = T["model.norm.weight"].copy()
        minus["model.norm.weight"][j] -= h
        fd = (ref_loss(plus) - ref_loss(minus)) / (2 * h)
        assert float(grad[j]) == pytest.approx(fd, rel=2e-3, abs=1e-5)


def test_balance_loss_ignores_padding(tiny_model_factory):
    model, _ = load_hf_model(tiny_model_factory("shared"), dtype=torch.float32)
    ids = torch.tensor([[5, 9, 33, 7, 2, 0, 0, 0]])
    model(ids)
    padded = [balance_loss(b, torch.tensor([True] * 5 + [False] * 3)) for b in model.moe_blocks().values()]
    model(ids[:, :5])
    plain = [balance_loss(b) for b in model.moe_blocks().values()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(padded, plain))


@pytest.fixture(scope="module")
def slim_and_data(tiny_model_factory, tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    data = write_jsonl(d / "med.jsonl", sample_texts(24, seed=3))
    other = write_jsonl(d / "other.jsonl", sample_texts(6, seed=4))
    return tiny_model_factory("shared"), data, other


def _settings(**kw):
    return FinetuneSettings(**{"batch_size": 8, "micro_batch": 4, "lr": 3e-3, "heldout_frac": 0.2,
                               "checkpoint_every": 2, **kw})


def test_finetune_writes_provenance_and_improves_heldout(slim_and_data, tmp_path):
    model, data, other = slim_and_data
    (src := tmp_path / "slim").mkdir()
    for f in model.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "pruning_metadata.json").write_text(json.dumps({"emo_version": "x", "experts_kept_per_layer": [None] * 3}))
    out = tmp_path / "ft"
    rec = finetune(src, [str(data)], out, _settings(epochs=3), device="cpu", eval_data=[str(other)])
    assert rec["loss"]["heldout"]["after"]["loss"] < rec["loss"]["heldout"]["before"]["loss"]
    assert set(rec["loss"]) == {"heldout", str(other)} and rec["steps"] == 3 * math.ceil(rec["train_windows"] / 8)
    assert json.loads((out / "pruning_metadata.json").read_text())["emo_version"] == "x"
    assert json.loads((out / "finetune.json").read_text())["data_hash"] == rec["data_hash"]
    assert "loss before (checkpoint 0)" in (out / "FINETUNE.md").read_text()
    assert not tmp_path.joinpath("ft.partial").exists()
    inp = {k: v for f in src.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    ck0 = load_file(str(out / "checkpoint-0" / "model.safetensors"))
    assert inp.keys() == ck0.keys() and all(torch.equal(inp[k], ck0[k]) for k in inp)  # the input, unchanged
    tuned = load_file(str(out / "model.safetensors"))
    assert not torch.equal(tuned["lm_head.weight"], inp["lm_head.weight"])
    again = finetune(out, [str(data)], tmp_path / "ft2", _settings(epochs=0.2), device="cpu",
                     save_checkpoint_0=False)  # a chain of finetunes stays traceable
    assert again["previous_finetunes"][-1]["data_hash"] == rec["data_hash"]


def test_resume_continues_exactly(slim_and_data, tmp_path):
    model, data, _ = slim_and_data
    small = {"epochs": 2, "batch_size": 4, "micro_batch": 2}
    straight = finetune(model, [str(data)], tmp_path / "a", _settings(**small), device="cpu")

    def crash(step, *_):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(model, [str(data)], tmp_path / "b", _settings(**small), device="cpu", progress=crash)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.partial" / "state" / "state.json").exists()
    with pytest.raises(EmoError, match="--resume"):
        finetune(model, [str(data)], tmp_path / "b", _settings(**small), device="cpu")
    with pytest.raises(EmoError, match="different settings"):
        finetune(model, [str(data)], tmp_path / "b", _settings(**small, lr=1e-3), device="cpu", resume=True)
    resumed = finetune(model, [str(data)], tmp_path / "b", _settings(**small), device="cpu", resume=True)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert resumed["loss"] == straight["loss"] and resumed["history"] == [
        {**h, "seconds": r["seconds"]} for h, r in zip(straight["history"], resumed["history"])]
    assert (tmp_path / "b" / "checkpoint-0" / "config.json").exists()


@pytest.mark.parametrize("freeze, changed", [("experts", {"attention", "router", "other"}),
                                             ("non-expert", {"expert"}), ("router", {"expert", "attention", "other"})])
def test_freeze_modes_keep_their_part_unchanged(slim_and_data, tmp_path, freeze, changed):
    model, data, _ = slim_and_data
    finetune(model, [str(data)], tmp_path / "ft", _settings(epochs=0.5, freeze=freeze), device="cpu",
             save_checkpoint_0=False)
    before, _ = load_hf_model(model, dtype=torch.float32)
    after, _ = load_hf_model(tmp_path / "ft", dtype=torch.float32)
    moved = set()
    from emo_cli.training.finetune import parameter_role
    for (name, p), q in zip(before.named_parameters(), after.parameters()):
        assert trains(name, freeze) == (parameter_role(name) in changed)
        if not torch.equal(p, q):
            moved.add(parameter_role(name))
    assert moved == changed


def test_bf16_precision_trains_and_keeps_frozen_weights(slim_and_data, tmp_path):
    model, data, _ = slim_and_data
    rec = finetune(model, [str(data)], tmp_path / "ft", _settings(epochs=1, precision="bf16", freeze="experts"),
                   device="cpu", save_checkpoint_0=False)
    assert rec["settings"]["precision"] == "bf16"
    assert rec["loss"]["heldout"]["after"]["loss"] < rec["loss"]["heldout"]["before"]["loss"]
    a, b = load_file(str(next(model.glob("model-00002*")))), load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert torch.equal(a["model.layers.1.mlp.experts.3.up_proj.weight"], b["model.layers.1.mlp.experts.3.up_proj.weight"])


def test_memory_check_refuses_before_loading(slim_and_data, tmp_path, monkeypatch):
    model, data, _ = slim_and_data
    monkeypatch.setattr("emo_cli.training.finetune.available_memory", lambda device: 1000)
    with pytest.raises(EmoError, match="--freeze experts"):
        finetune(model, [str(data)], tmp_path / "ft", _settings(), device="cpu")
    assert not any(tmp_path.iterdir())


def test_memory_estimate_is_in_help_and_readme():
    from emo_cli.cli.commands.finetune import finetune_cmd

    sentence = memory_help()
    assert sentence in " ".join(finetune_cmd.__doc__.split())
    assert sentence in " ".join((ROOT / "README.md").read_text().split())


def test_mc_rows_read_with_shots_train_on_answers(tiny_model_factory, tmp_path):
    rows = [{"question": f"Q{i}: the patient was given?", "choices": ["aspirin", "pain"], "answer": i % 2}
            for i in range(12)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = read_documents([str(path)], shots=2)
    tok = EmoTokenizer.from_dir(tiny_model_factory("shared"))
    got, _, _ = target_text(tok, docs[3])
    assert got.strip() == "pain"  # only the item's own answer, not the solved shots before it


def _emo(*args, cwd):
    return subprocess.run([sys.executable, "-m", "emo_cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_refuses_user_folders_and_reports_a_table(slim_and_data, tmp_path):
    model, data, _ = slim_and_data
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = _emo("finetune", str(model), "--data", str(data), "-o", "mine", "--force", cwd=tmp_path)
    assert r.returncode == 1 and "not an emo finetune output" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    r = _emo("finetune", str(model), "--data", str(data), "--freeze", "everything", cwd=tmp_path)
    assert r.returncode == 1 and "--freeze 'everything'" in r.stderr
    r = _emo("finetune", str(model), "--data", str(data), "-o", "ft", "--batch-size", "4", "--epochs", "0.3",
             "--heldout-frac", "0.2", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["output"] == "ft" and rec["steps"] == 2 and rec["command"].startswith("emo finetune")
