"""emo merge-back: a slim model's experts go back to their original ids in the full model."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from emo_cli.cli import app as cli
from emo_cli.model.checkpoint import SafetensorsCheckpoint
from emo_cli.errors import EmoError
from emo_cli.experts.merge_back import merge_back
from tiny_models import sample_texts, write_jsonl


def tensors(d):
    ck = SafetensorsCheckpoint(d)
    return {n: ck.get(n) for n in ck.names()}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_factory):
    d = tmp_path_factory.mktemp("merge")
    full = tiny_model_factory("shared")
    write_jsonl(d / "med.jsonl", sample_texts(30, seed=4))
    for argv in (["profile", "med.jsonl", "--model", str(full), "--seq-len", "32"],
                 ["prune", "--budget", "50%", "--no-gguf"]):
        old, sys.argv, cwd = sys.argv, ["emo", *argv], os.getcwd()
        os.chdir(d)
        try:
            cli.main()
        except SystemExit as e:
            assert not e.code
        finally:
            sys.argv = old
            os.chdir(cwd)
    return full, d / "slim-med"


def test_merging_an_unfinetuned_slim_model_gives_the_full_model_bit_for_bit(pruned, tmp_path):
    full, slim = pruned
    for include, average in (((), None), (("router", "shared", "non-expert"), None), (("router",), 0.5)):
        out = tmp_path / f"m-{len(include)}-{average}"
        record = merge_back(slim, full, out, set(include), average)
        want, got = tensors(full), tensors(out)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[n], got[n]) for n in want), include
        assert json.loads((out / "merge_metadata.json").read_text())["experts_merged_per_layer"] == \
            record["experts_merged_per_layer"]
        assert (out / "config.json").read_text() == (full / "config.json").read_text()


def test_finetuned_experts_land_at_their_original_ids(pruned, tmp_path):
    full, slim = pruned
    kept = json.loads((slim / "pruning_metadata.json").read_text())["experts_kept_per_layer"]
    tuned = tmp_path / "tuned"
    shutil.copytree(slim, tuned)
    shard = next(tuned.glob("*.safetensors"))
    t = load_file(str(shard))
    name = "model.layers.1.mlp.experts.0.up_proj.weight"  # local expert 0 of layer 1
    t[name] = t[name] + 1.0
    router = "model.layers.1.mlp.gate.weight"
    t[router] = t[router] * 2.0
    save_file(t, str(shard), metadata={"format": "pt"})
    orig = kept[1][0]
    base = tensors(full)

    merge_back(tuned, full, tmp_path / "a")
    got = tensors(tmp_path / "a")
    target = f"model.layers.1.mlp.experts.{orig}.up_proj.weight"
    assert torch.equal(got[target], base[target] + 1.0)
    assert torch.equal(got[router], base[router])  # routers stay unless asked for
    assert all(torch.equal(got[n], base[n]) for n in base if n not in (target,))

    merge_back(tuned, full, tmp_path / "b", {"router"}, average=0.5)
    half = tensors(tmp_path / "b")
    assert torch.allclose(half[target], base[target] + 0.5, atol=1e-6)
    n_shared = 1
    routed_kept = [e for e in kept[1] if e < base[router].shape[0] - n_shared]
    assert torch.allclose(half[router][routed_kept], base[router][routed_kept] * 1.5, atol=1e-6)
    others = [e for e in range(base[router].shape[0]) if e not in routed_kept]
    assert torch.equal(half[router][others], base[router][others])


def test_merge_refuses_what_does_not_fit(pruned, tmp_path, tiny_model_factory):
    full, slim = pruned
    with pytest.raises(EmoError, match="not a pruned model"):
        merge_back(full, full, tmp_path / "x")
    with pytest.raises(EmoError, match="another model"):
        merge_back(slim, tiny_model_factory("plain"), tmp_path / "y")
    with pytest.raises(EmoError, match="--average"):
        merge_back(slim, full, tmp_path / "z", average=1.5)
    (tmp_path / "exists").mkdir()
    with pytest.raises(EmoError, match="exists"):
        merge_back(slim, full, tmp_path / "exists")
