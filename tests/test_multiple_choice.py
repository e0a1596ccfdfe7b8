"""Multiple-choice accuracy equals a float64 reference computation on a small hand-made set."""

import json
import math

import numpy as np

import reference_emo
from emo_cli.evaluation.multiple_choice import continuation_ids, evaluate_mc, read_mc_items
from emo_cli.runtime import load_model

ITEMS = [
    {"question": "The patient was given a dose of", "choices": ["aspirin", "theorem", "lambda"], "answer": 0},
    {"question": "def return", "choices": ["value", "the doctor ordered tests"], "answer": "A"},
    {"question": "license permission granted", "choices": ["warranty", "unto them", "sum of squares"], "answer": "2"},
    {"question": "he said unto", "choices": ["them", "print", "integral"], "answer": "c"},
]


def test_mc_matches_reference(tiny_model_factory, tmp_path):
    d = tiny_model_factory("gqa")
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    items = read_mc_items(str(path))
    assert [it.answer for it in items] == [0, 0, 2, 2]
    lm = load_model(d)
    got = evaluate_mc(lm.model, lm.tokenizer, items)
    cfg, T = reference_emo.load_tensors(d)
    acc = acc_norm = 0
    for it in items:
        scores = []
        for c in it.choices:
            ctx, cont = continuation_ids(lm.tokenizer, it.question, " " + c)
            ids = ctx + cont
            logits = reference_emo.forward(cfg, T, ids)
            lp = 0.0
            for p in range(len(ctx) - 1, len(ids) - 1):
                z = logits[p] - logits[p].max()
                lp += z[ids[p + 1]] - math.log(np.exp(z).sum())
            scores.append(lp)
        acc += int(int(np.argmax(scores)) == it.answer)
        norm = [s / len(c.encode()) for s, c in zip(scores, it.choices)]
        acc_norm += int(int(np.argmax(norm)) == it.answer)
    assert got == {"acc": acc / 4, "acc_norm": acc_norm / 4, "items": 4}


def write_mc(path, n=30, seed=0):
    from tiny_models import sample_texts

    texts = sample_texts(n * 2, seed=seed, words_per_doc=(4, 10))
    rows = [{"question": f"Q{i}: {texts[2 * i]}", "choices": texts[2 * i + 1].split()[:3] + ["none"],
             "answer": i % 3} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_mc_rows_profile_as_few_shot_prompt_plus_gold_answer(tmp_path):
    from emo_cli.data.documents import heldout_split, read_documents

    rows = write_mc(tmp_path / "mc.jsonl")
    docs = read_documents([tmp_path / "mc.jsonl"], shots=3)
    again = read_documents([tmp_path / "mc.jsonl"], shots=3, max_docs=10)
    assert [d.text for d in docs[:10]] == [d.text for d in again]  # seeded per item, whatever is kept
    for i, d in enumerate(docs):
        own = f"{rows[i]['question']} {rows[i]['choices'][rows[i]['answer']]}"
        assert d.text.endswith(own) and d.text.count("\n\n") == 3
        shots = d.text[:-len(own)].split("\n\n")[:3]
        assert all(s.startswith("Q") and not s.startswith(f"Q{i}:") for s in shots)  # never the item itself
        assert d.item.answer == rows[i]["answer"] % len(rows[i]["choices"])
    zero = read_documents([tmp_path / "mc.jsonl"])
    assert zero[0].text == f"{rows[0]['question']} {rows[0]['choices'][0]}"
    held3 = [d.index for d in heldout_split(docs, 0.2, salt="emo-profile:")[1]]
    held0 = [d.index for d in heldout_split(zero, 0.2, salt="emo-profile:")[1]]
    assert held3 == held0 and held3  # item-level split: --shots never moves an item


def test_prune_reports_heldout_mc_accuracy_equal_to_the_slim_model(tiny_model_factory, tmp_path, monkeypatch, capsys):
    import sys

    from emo_cli.cli import app as cli

    write_mc(tmp_path / "mc.jsonl", n=40, seed=1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMO_MODEL", raising=False)
    model = tiny_model_factory("shared")
    for argv in (["profile", "mc.jsonl", "--model", str(model), "--shots", "2", "--seq-len", "128",
                  "--heldout-frac", "0.25"],
                 ["prune", "--budget", "50%", "--no-gguf", "--json"]):
        monkeypatch.setattr(sys, "argv", ["emo", *argv])
        try:
            cli.main()
        except SystemExit as e:
            assert not e.code, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ev = report["eval"]["heldout"]
    from emo_cli.experts.pipeline import heldout_documents
    from emo_cli.experts.usage_profile import Profile

    items = [d.item for d in heldout_documents([Profile.load(tmp_path / "mc.profile.safetensors")])]
    assert ev["items"] == len(items) > 0 and items[0].prefix.count("\n\n") == 2
    full, slim = load_model(str(model)), load_model(str(tmp_path / "slim-mc"))
    assert ev["acc_before"] == evaluate_mc(full.model, full.tokenizer, items, 128)["acc"]
    assert ev["acc_after"] == evaluate_mc(slim.model, slim.tokenizer, items, 128)["acc"]  # masking identity
