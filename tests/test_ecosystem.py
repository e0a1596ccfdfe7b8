"""Outputs that drop into the ecosystem: a slim directory that loads where its source loads (code
files, generation config, license, shards with an index, a model card the Hub reads), and GGUF
metadata that llama.cpp, LM Studio and Ollama show."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from gguf import GGUFReader

from emo_cli.cli import app as cli
from emo_cli.experts.model_card import front_matter
from emo_cli.runtime import load_model
from tiny_models import sample_texts, write_jsonl

CONFIG_CODE = "class EmoConfig:  # stands for the released configuration_emo.py\n    pass\n"
MODELING_CODE = "from .configuration_emo import EmoConfig\nfrom .emo_utils import helper\n"


def emo(argv, capsys):
    old, sys.argv = sys.argv, ["emo", *map(str, argv)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def cached_release(tmp_path: Path, src: Path) -> Path:
    """The tiny model laid out as a Hub download in the local cache: acme/Emo-test, remote code,
    a model card with a license, LICENSE and generation_config.json."""
    snap = tmp_path / "hub" / "models--acme--Emo-test" / "snapshots" / "abc123"
    shutil.copytree(src, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    cfg = json.loads((snap / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_emo.EmoConfig", "AutoModelForCausalLM": "modeling_emo.EmoForCausalLM"}
    (snap / "config.json").write_text(json.dumps(cfg))
    (snap / "configuration_emo.py").write_text(CONFIG_CODE)
    (snap / "modeling_emo.py").write_text(MODELING_CODE)
    (snap / "emo_utils.py").write_text("def helper():\n    return 1\n")
    (snap / "unrelated.py").write_text("print('not named by auto_map')\n")
    (snap / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg["eos_token_id"]}))
    (snap / "LICENSE").write_text("Apache License 2.0 (test copy)\n")
    (snap / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n\n# Emo-test\n")
    return snap


def test_slim_directory_is_self_contained_and_carries_a_model_card(tmp_path, capsys, monkeypatch,
                                                                   tiny_model_factory):
    import emo_cli.experts.slim_hf as prune

    snap = cached_release(tmp_path, tiny_model_factory("shared"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("EMO_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prune, "MAX_SHARD_BYTES", 60_000)  # the 5 GB rule, scaled to a tiny model
    write_jsonl(tmp_path / "med.jsonl", sample_texts(30, seed=3))
    emo(["profile", "med.jsonl", "--model", "acme/Emo-test", "--seq-len", "32"], capsys)
    emo(["prune", "--budget", "50%", "--quant", "q8_0"], capsys)
    slim = tmp_path / "slim-med"

    for name in ("configuration_emo.py", "modeling_emo.py", "emo_utils.py", "generation_config.json", "LICENSE"):
        assert (slim / name).read_bytes() == (snap / name).read_bytes(), name
    assert not (slim / "unrelated.py").exists()
    assert json.loads((slim / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == "modeling_emo.EmoForCausalLM"

    index = json.loads((slim / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum((slim / s).stat().st_size for s in shards) - sum(
        8 + int.from_bytes((slim / s).read_bytes()[:8], "little") for s in shards)  # data bytes only
    monkeypatch.setattr(prune, "MAX_SHARD_BYTES", 5 * 10**9)
    emo(["prune", "--plan", "slim-med/plan.json", "-o", "single", "--no-gguf"], capsys)
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    assert torch.equal(load_model(str(slim)).model(ids), load_model(str(tmp_path / "single")).model(ids))

    card = (slim / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "acme/Emo-test" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["tags"] == ["emo", "mixture-of-experts", "pruned"]
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    report = json.loads((slim / "report.json").read_text())
    ev = report["eval"]["heldout"]
    assert f"| heldout | {ev['docs']} | {ev['before']:.4f} | {ev['after']:.4f} |" in card
    assert "emo prune --budget 50% --quant q8_0" in card and "`frequency`" in card and "slim-med.gguf" in card

    reader = GGUFReader(tmp_path / "slim-med.gguf")
    general = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("general.")}
    assert general["general.license"] == "apache-2.0"
    assert general["general.base_model.count"] == 1
    assert "acme/Emo-test" in general["general.base_model.0.repo_url"]
    assert general["general.name"] and general["general.size_label"].startswith("3x")
    assert general["general.file_type"] == 7  # MOSTLY_Q8_0
    assert "emo.experts_kept_per_layer" in reader.fields  # emo's provenance stays
    info = json.loads(emo(["info", "slim-med.gguf", "--json"], capsys))
    assert info["general"]["license"] == "apache-2.0" and info["general"]["size_label"] == general["general.size_label"]


def test_progress_shows_what_moves():
    from emo_cli.ui import Throughput, progress

    prog = progress(disable=True)
    writing = prog.add_task("writing", total=4, bytes=0)
    prog.update(writing, advance=1, bytes=5_250_000)
    passes = prog.add_task("profiling", total=4, tokens=0)
    prog.update(passes, advance=1, tokens=2048)
    evals = prog.add_task("greedy evaluations", total=None)
    column = Throughput()
    assert column.render(prog.tasks[writing]).plain.startswith("5.2 MB ") and "MB/s" in column.render(prog.tasks[writing]).plain
    assert column.render(prog.tasks[passes]).plain.startswith("2,048 tok ")
    assert column.render(prog.tasks[evals]).plain == ""
