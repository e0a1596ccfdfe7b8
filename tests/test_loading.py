"""Model resolution (local dirs, the HF cache), dtypes from tensor headers, vocabulary from shapes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from emo_cli.errors import EmoError
from emo_cli.model.loading import resolve_model_path
from emo_cli.runtime import load_model

TEXT = "license permission granted and the doctor ordered tests 123"


def test_repo_id_resolves_from_local_hf_cache(tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(EmoError, match="not in the local Hugging Face cache"):
        resolve_model_path("allenai/Emo_1b14b_1T")
    repo = tmp_path / "hub" / "models--allenai--Emo_1b14b_1T"
    shutil.copytree(tiny_model_factory("shared"), repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_model_path("allenai/Emo_1b14b_1T") == repo / "snapshots" / "abc123"
    lm = load_model("allenai/Emo_1b14b_1T")
    assert lm.config.num_experts == 8


def _rewrite(src, dst, fn, cfg_edit=None):
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: fn(v) for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    if cfg_edit:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(cfg_edit)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_checkpoints_load_exactly(tiny_model_factory, tmp_path, dtype):
    src = tiny_model_factory("gqa")
    half = _rewrite(src, tmp_path / "half", lambda t: t.to(dtype), cfg_edit={"vocab_size": 5})
    rounded = _rewrite(src, tmp_path / "rounded", lambda t: t.to(dtype).float())
    a, b = load_model(half), load_model(rounded)
    assert a.config.vocab_size == b.config.vocab_size  # from the tensor shape, not the config
    assert a.model.dtype == torch.float32  # computed in fp32 on the CPU
    ids = torch.tensor([a.tokenizer.encode(TEXT)])
    assert torch.equal(a.model(ids), b.model(ids))
    kept = load_model(half, dtype="bfloat16" if dtype == torch.bfloat16 else "float16")
    assert kept.model.dtype == dtype
