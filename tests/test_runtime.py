"""The runtime equals an independent float64 reference, for every routing path and layout."""

import numpy as np
import torch

import reference_emo
from emo_cli.data.documents import Document
from emo_cli.evaluation.loss import evaluate_loss
from emo_cli.model.passes import batch_nll
from emo_cli.runtime import load_model


def _ids(lm, text):
    return lm.tokenizer.encode(text)


def test_logits_match_float64_reference(tiny_model_factory, any_variant):
    d = tiny_model_factory(any_variant)
    lm = load_model(d)
    cfg, T = reference_emo.load_tensors(d)
    ids = _ids(lm, "The patient was given a dose of aspirin. def return 42!")
    ours = lm.model(torch.tensor([ids]))[0].double().numpy()
    ref = reference_emo.forward(cfg, T, ids)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-5, rel


def test_kv_cache_equals_full_recompute(tiny_model_factory, any_variant):
    lm = load_model(tiny_model_factory(any_variant))
    ids = torch.tensor([_ids(lm, "theorem proof lemma integral sum of squares equals the doctor")])
    full = lm.model(ids)
    cache = lm.model.new_cache()
    parts = [lm.model(ids[:, :5], cache=cache)]
    for t in range(5, ids.shape[1]):
        parts.append(lm.model(ids[:, t:t + 1], cache=cache))
    inc = torch.cat(parts, dim=1)
    assert ((inc - full).abs().max() / full.abs().max()) < 1e-5


def test_padded_batch_equals_one_by_one(tiny_model_factory):
    lm = load_model(tiny_model_factory("gqa"))
    texts = ["short one", "a much longer document about the patient and the dose of aspirin given",
             "def return value"]
    rows = [_ids(lm, t) for t in texts]
    S = max(map(len, rows))
    ids = torch.full((3, S), lm.tokenizer.pad_id)
    mask = torch.zeros((3, S), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    ((batched,),) = batch_nll(lm.model, [ids], [mask])
    for i, r in enumerate(rows):
        ((alone,),) = batch_nll(lm.model, [torch.tensor([r])], [torch.ones(1, len(r), dtype=torch.bool)])
        assert abs(float(batched[i]) - float(alone[0])) < 1e-4 * max(1.0, abs(float(alone[0])))


def test_eval_loss_matches_reference(tiny_model_factory):
    d = tiny_model_factory("dense_lead")
    lm = load_model(d)
    cfg, T = reference_emo.load_tensors(d)
    texts = ["the patient was given a dose", "license permission granted, warranty liability 12!"]
    docs = [Document(t, "x", i) for i, t in enumerate(texts)]
    r = evaluate_loss(lm.model, lm.tokenizer, docs, seq_len=2048)
    nll = sum(reference_emo.doc_nll(cfg, T, _ids(lm, t)) for t in texts)
    ntok = sum(len(_ids(lm, t)) - 1 for t in texts)
    assert r.tokens == ntok
    assert abs(r.loss - nll / ntok) / (nll / ntok) < 1e-5
    nbytes = sum(len(t.encode()) for t in texts)
    assert abs(r.bits_per_byte - nll / np.log(2) / nbytes) < 1e-6 * r.bits_per_byte


