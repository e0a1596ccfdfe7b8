"""The registries behind the command line, and the typed profile metadata.

Every selection method (experts/methods.py) and quant type (gguf/quants.py QUANTS) is offered by
the commands that take one; a value outside them ends in one `error:` line before anything is read
or loaded; profile metadata keeps every key, known or not, through a file.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from test_cli import run
from emo_cli.experts.methods import METHODS, REPORT_METHODS
from emo_cli.experts.usage_profile import DataPart, MergedData, Profile
from emo_cli.gguf.quants import QUANTS

METHOD_CHOICES = "<" + "|".join(m.name for m in METHODS) + ">"
QUANT_CHOICES = "<" + "|".join(QUANTS) + ">"


@pytest.mark.parametrize("command, choices", [("prune", [METHOD_CHOICES, QUANT_CHOICES]),
                                              ("demo", [METHOD_CHOICES]),
                                              ("report", ["<" + "|".join(m.name for m in REPORT_METHODS) + ">"]),
                                              ("export", [QUANT_CHOICES])])
def test_commands_offer_what_the_registries_hold(command, choices, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # the choices on one line
    code, out, err = run([command, "--help"], capsys)
    assert code == 0, err
    for listed in choices:
        assert listed in out, out
    if command == "prune":  # each method's help label, from the registry
        words = " ".join(out.replace("│", " ").split())
        assert all(f"{m.name}: {m.label}" in words for m in METHODS)


def test_report_offers_only_the_methods_that_describe_a_domain():
    assert [m.name for m in REPORT_METHODS] == ["frequency", "reap", "easyep"]
    assert all(m.kind == "score" for m in REPORT_METHODS)


@pytest.mark.parametrize("argv, needle", [
    (["prune", "--method", "frequncy", "--budget", "4"], "unknown method 'frequncy' (choose from frequency, router,"),
    (["prune", "--quant", "q3", "--budget", "4"], "unknown quant 'q3' (use f32, f16,"),
    (["export", "no-such-model", "--quant", "Q8_0"], "unknown quant 'Q8_0'"),
    (["report", "no.profile.safetensors", "--method", "random"], "--method 'random': a report uses a score method"),
    (["demo", "--method", "best"], "unknown method 'best'"),
    (["prune", "--allocation", "even", "--budget", "4"], "unknown allocation 'even' (uniform or global)"),
])
def test_a_value_outside_a_registry_fails_before_anything_is_read(argv, needle, tmp_path, capsys, monkeypatch):
    import emo_cli.runtime

    monkeypatch.chdir(tmp_path)  # no profile, no model, no workspace: any of them read would fail otherwise
    monkeypatch.setattr(emo_cli.runtime, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(Profile, "load", classmethod(lambda *a, **k: pytest.fail("read a profile")))
    code, out, err = run(argv, capsys)
    assert code == 1, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert needle in err, err
    assert out == "" and list(tmp_path.iterdir()) == []


def _profile_file(path, meta: dict) -> None:
    tensors = {k: torch.rand(2, 4, dtype=torch.float64) for k in ("counts", "prob", "reap", "easyep")}
    tensors["tokens"] = torch.full((2,), 30.0, dtype=torch.float64)
    save_file(tensors, str(path), metadata={"emo_profile": json.dumps(meta, sort_keys=True)})


def _stored(path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["emo_profile"]


def test_profile_metadata_round_trips_every_key(tmp_path):
    """A merged profile whose parts come from two emo versions (the older without held-out ids or
    shots), with keys emo does not know in every section: all read typed, all written back."""
    old_part = {"sources": ["/d/a.jsonl"], "text_field": None, "max_docs": None, "docs": 3, "tokens": 30,
                "hash": "h1", "from_a_fork": [1, 2]}
    new_part = {"sources": ["/d/b.jsonl"], "text_field": "body", "max_docs": 9, "docs": 4, "tokens": 40, "hash": "h2",
                "heldout_ids": [5, 7], "shots": 0, "multiple_choice": False, "total_docs": 6, "heldout_frac": 0.25}
    meta = {"model": {"path": "/m", "fingerprint": "abc", "expert_ids": [[0, 1, 2, 3], None],
                      "fixed_ids": [[3], None], "routed_top_k": [1, 0], "top_k": 2, "spec": "acme/m", "note": "x"},
            "data": {"sources": ["/d/a.jsonl", "/d/b.jsonl"], "docs": 7, "tokens": 70, "hash": "h1+h2",
                     "parts": [old_part, new_part], "extra": {"nested": True}},
            "settings": {"seq_len": 16, "batch_size": 2, "max_tokens": None, "stride": 8},
            "emo_version": "0.1.0", "annotations": {"who": "me"}}
    path = tmp_path / "a.profile.safetensors"
    _profile_file(path, meta)
    prof = Profile.load(path)

    assert prof.meta.model.spec == "acme/m" and prof.meta.model.top_k == 2 and prof.meta.model.extra == {"note": "x"}
    assert isinstance(prof.meta.data, MergedData) and prof.meta.data.extra == {"extra": {"nested": True}}
    old, new = prof.parts()
    assert isinstance(old, DataPart) and old.heldout_ids is None and old.shots is None
    assert old.extra == {"from_a_fork": [1, 2]}
    assert new.heldout_ids == [5, 7] and new.text_field == "body" and new.heldout_frac == 0.25
    assert prof.meta.settings.max_tokens is None and prof.meta.settings.extra == {"stride": 8}
    assert prof.meta.emo_version == "0.1.0" and prof.meta.extra == {"annotations": {"who": "me"}}
    assert prof.docs == 7 and prof.moe_layers() == [0] and prof.routed_ids(0) == [0, 1, 2]

    prof.save(tmp_path / "b.profile.safetensors")
    assert _stored(tmp_path / "b.profile.safetensors") == _stored(path)  # the same bytes
    again = Profile.load(tmp_path / "b.profile.safetensors")
    assert again.meta == prof.meta


@pytest.mark.parametrize("section, key, value, problem", [
    ("model", "top_k", "2", "model.top_k missing or not int"),
    ("data", "hash", None, "data.hash missing or not str"),
    ("settings", "seq_len", None, "settings.seq_len missing or not int"),
    ("data", "parts", [], "data.parts malformed"),
])
def test_metadata_of_another_type_is_refused_at_load(tmp_path, section, key, value, problem):
    from emo_cli.errors import EmoError

    meta = {"model": {"path": "/m", "fingerprint": "abc", "expert_ids": [[0, 1, 2, 3], [0, 1, 2, 3]],
                      "fixed_ids": [[3], [3]], "routed_top_k": [1, 1], "top_k": 2},
            "data": {"sources": ["/d.jsonl"], "text_field": None, "max_docs": None, "docs": 3, "tokens": 30,
                     "hash": "h", "heldout_ids": []},
            "settings": {"seq_len": 16, "batch_size": 2, "max_tokens": None}}
    meta[section][key] = value
    path = tmp_path / "x.profile.safetensors"
    _profile_file(path, meta)
    with pytest.raises(EmoError, match="not a valid emo profile") as e:
        Profile.load(path)
    assert problem in str(e.value)
