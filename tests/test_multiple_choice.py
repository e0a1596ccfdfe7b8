"""Multiple-choice accuracy equals a float64 reference computation on a small hand-made set."""

import json
import math

import numpy as np

import reference_emo
from emo_cli.multiple_choice import continuation_ids, evaluate_mc, read_mc_items
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
