import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from emo_cli.errors import EmoError
from emo_cli.model.loading import load_hf_model
from emo_cli.arch.emo import EmoForCausalLM
from emo_cli.lab.pretrain import (RouterHook, init_model, model_config, pretrain, segment_ids)
from emo_cli.lab.pretrain_recipe import parse_recipe
from safetensors.torch import load_file
from tiny_corpus import SMALL, small_corpus

TINY = """
name = "{name}"
[corpus]
dir = "{corpus}"
domains = ["code", "medical", "legal"]
max_chars_per_domain = {max_chars_per_domain}
max_heldout_docs = {max_heldout_docs}
min_chars = {min_chars}
max_chars = {max_chars}
fetch = false
[tokenizer]
vocab_size = 320
[model]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 4
intermediate_size = 16
num_experts = 8
num_experts_per_tok = 3
num_shared_experts = 1
[pool]
enabled = {pool}
min_size = 2
max_size = 7
[train]
seq_len = 64
batch_size = 4
steps = 24
lr = 0.01
warmup_steps = 2
checkpoint_every = 12
log_every = 4
save_dtype = "float32"
"""


def tiny_recipe(corpus, name="t", pool="true"):
    return parse_recipe(TINY.format(name=name, corpus=corpus, pool=pool, **{k: v for k, v in SMALL.items()
                                    if k not in ("domains", "fetch")}), "tiny.toml")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these tensors are tiny: a second thread only adds synchronisation, which costs a lot on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    record = pretrain(tiny_recipe(corpus), out, device="cpu", keep_checkpoint=True)
    return out, record


def test_pool_constraint_and_routing_inside_pool():
    rec = parse_recipe(TINY.format(name="p", corpus="unused", pool="true", **{k: v for k, v in SMALL.items()
                                   if k not in ("domains", "fetch")}))
    cfg = model_config(rec, vocab_size=300, eos_id=0, pad_id=1)
    model = init_model(cfg, 0.5, seed=3)  # a large init spreads routing, so pools really bind
    hook = RouterHook(rec.pool.min_size, rec.pool.max_size, enabled=True)
    for blk in model.moe_blocks().values():
        blk.pool_fn = hook
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 300, (3, 40), generator=g)
    ids[0, 10] = ids[0, 25] = ids[2, 5] = 0  # EOS: 3 + 1 + 2 segments
    seg, G = segment_ids(ids, eos_id=0)
    assert G == 6
    hook.reseed(11)
    with torch.no_grad():
        model(ids, segments=seg, num_segments=G)
    k = cfg.num_experts_per_tok - 1
    R = cfg.num_experts - 1
    for i, blk in model.moe_blocks().items():
        r = blk.last_routing
        logits = hook.seen[i][0].double().numpy()[:, :R]  # [T, R]
        d = hook.sizes[i].numpy()
        assert (r.experts[:, k:] == R).all() and (r.weights[:, k:] == 1.0).all()  # shared: last, weight 1
        for s in range(G):
            toks = (seg == s).numpy()
            p = np.exp(logits[toks] - logits[toks].max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            pool = set(np.argsort(-p.sum(0), kind="stable")[:d[s]].tolist())
            used = set(r.experts[torch.from_numpy(toks), :k].reshape(-1).tolist())
            assert len(used) <= d[s] and used <= pool
            for t in np.nonzero(toks)[0]:  # each token: top-k of the softmax renormalised on the pool
                lp = np.full(R, -np.inf)
                lp[list(pool)] = logits[t, list(pool)]
                q = np.exp(lp - lp.max())
                q /= q.sum()
                top = np.argsort(-q, kind="stable")[:k]
                assert set(top.tolist()) == set(r.experts[t, :k].tolist())
                np.testing.assert_allclose(np.sort(q[top]), np.sort(r.weights[t, :k].double().numpy()), rtol=1e-5)
    assert any(len(set(r.experts[:, :k].reshape(-1).tolist())) > max(hook.sizes[i].min().item(), k)
               for i, r in ((i, b.last_routing) for i, b in model.moe_blocks().items()))


def test_training_learns_and_saved_model_reloads_exactly(straight_run, corpus):
    out, record = straight_run
    hist = record["history"]
    assert hist[-1]["ce"] < hist[0]["ce"]
    assert all(v < math.log(320) for v in record["heldout_loss"].values())  # better than uniform
    assert record["tokens"] == 24 * 4 * 64 and record["document_pool"] == {"min_size": 2, "max_size": 7}
    saved, files = load_hf_model(out)
    assert files.config.model_type == "emo" and files.config.num_shared_experts == 1
    fresh = EmoForCausalLM(files.config)
    fresh.load_state_dict(load_file(str(out / "checkpoint" / "model.safetensors")))
    fresh.eval()
    ids = torch.randint(2, 300, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(saved(ids), fresh(ids))
    assert (out / "tokenizer.json").exists() and (out / "recipe.toml").exists() and (out / "training.json").exists()


def test_resume_continues_exactly(straight_run, corpus, tmp_path):
    out_a, _ = straight_run
    out_b = tmp_path / "resumed"
    recipe = tiny_recipe(corpus)

    def crash(step, *_):
        if step == 13:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        pretrain(recipe, out_b, device="cpu", progress=crash)
    assert not (out_b / "config.json").exists() and (out_b / "checkpoint" / "state.json").exists()
    with pytest.raises(EmoError, match="--resume"):
        pretrain(recipe, out_b, device="cpu")
    pretrain(recipe, out_b, resume=True, device="cpu")
    a, b = load_file(str(out_a / "model.safetensors")), load_file(str(out_b / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(EmoError, match="--force"):
        pretrain(recipe, out_b, device="cpu")


def test_standard_moe_uses_no_pool(corpus, tmp_path):
    record = pretrain(tiny_recipe(corpus, name="std", pool="false"), tmp_path / "std", device="cpu")
    assert record["document_pool"] is None and record["steps"] == 24


@pytest.mark.parametrize("edit, message", [
    (("[train]\n", "[train]\nbogus = 1\n"), "unknown key 'bogus' in [train]"),
    (("lr = 0.01", "lr = \"fast\""), "[train] lr must be a number"),
    (("steps = 24", "steps = 2.5"), "[train] steps must be an integer"),
    (("enabled = true", "enabled = 1"), "[pool] enabled must be true or false"),
    (("min_size = 2", "min_size = 1"), "[pool] need top-k routed (2) <= min_size"),
    (("domains = [\"code\", \"medical\", \"legal\"]", "domains = [\"code\", \"poetry\"]"), "unknown domain 'poetry'"),
    (("[model]", "[modle]"), "unknown key 'modle'"),
    (("vocab_size = 320", "vocab_size = "), "invalid TOML"),
])
def test_recipe_errors_are_one_line(edit, message):
    text = TINY.format(name="x", corpus="c", pool="true", **{k: v for k, v in SMALL.items() if k not in ("domains", "fetch")})
    assert edit[0] in text
    with pytest.raises(EmoError) as e:
        parse_recipe(text.replace(edit[0], edit[1], 1), "bad.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_reports_bad_recipe_in_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[train]\nsteps = "many"\n')
    r = subprocess.run([sys.executable, "-m", "emo_cli", "pretrain", "--recipe", str(bad)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "steps must be an integer" in r.stderr
