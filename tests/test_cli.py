"""The command line: the three documented commands in sequence, JSON output, and bad inputs that
must give one clear line, a non-zero exit, no traceback and no partial output."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emo_cli.cli import app as cli
from emo_cli.errors import EmoError
from tiny_models import sample_texts, write_jsonl


def run(argv, capsys, cwd=None, monkeypatch=None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    old = sys.argv
    sys.argv = ["emo", *map(str, argv)]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, needle):
    assert code == 1, err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in err, err


def test_profile_then_bare_prune_in_a_workspace(tiny_model_factory, tmp_path, capsys, monkeypatch):
    model = tiny_model_factory("shared")
    write_jsonl(tmp_path / "data" / "med.jsonl", sample_texts(30, seed=5))
    monkeypatch.setenv("EMO_MODEL", str(model))
    code, out, err = run(["profile", "data/med.jsonl"], capsys, tmp_path, monkeypatch)
    assert code == 0, err
    assert (tmp_path / "med.profile.safetensors").exists()
    monkeypatch.delenv("EMO_MODEL")
    code, out, err = run(["prune", "--budget", "50%", "--no-gguf", "--json"], capsys, tmp_path, monkeypatch)
    assert code == 0, err
    report = json.loads(out)
    assert report["kept_per_layer"] == {"0": 4, "1": 4, "2": 4}
    assert (tmp_path / "slim-med" / "pruning_metadata.json").exists()
    assert (tmp_path / "slim-med" / "plan.json").exists()
    # nothing is overwritten without --force
    code, _, err = run(["prune", "--budget", "50%", "--no-gguf"], capsys, tmp_path, monkeypatch)
    assert_clean_error(code, err, "--force")
    # --plan re-applies the saved plan exactly
    code, out, err = run(["prune", "--plan", "slim-med/plan.json", "--no-gguf", "-o", "again", "--json"],
                         capsys, tmp_path, monkeypatch)
    assert code == 0, err
    a = json.loads((tmp_path / "slim-med" / "pruning_metadata.json").read_text())
    b = json.loads((tmp_path / "again" / "pruning_metadata.json").read_text())
    assert a["experts_kept_per_layer"] == b["experts_kept_per_layer"]
    code, out, err = run(["prune", "--budget", "4", "--dry-run", "--json"], capsys, tmp_path, monkeypatch)
    assert code == 0 and json.loads(out)["dry_run"] and not (tmp_path / "slim-med.gguf").exists()


def test_eval_json(tiny_model_factory, tmp_path, capsys, med_data):
    m = tiny_model_factory("plain")
    code, out, err = run(["eval", m, m, "--data", med_data, "--json", "--max-docs", "5"], capsys)
    assert code == 0, err
    res = json.loads(out)["results"]
    assert len(res) == 2 and res[0]["loss"] == res[1]["loss"] and res[0]["docs"] == 5
    assert set(res[0]) == {"model", "data", "loss", "ppl", "bits_per_byte", "tokens", "docs"}


def _broken_model(src, tmp_path, how):
    d = tmp_path / how
    shutil.copytree(src, d)
    if how == "no-config":
        (d / "config.json").unlink()
    elif how == "no-shard":
        next(d.glob("model-00002*")).unlink()
    elif how == "bad-type":
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "llama"
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "bad-shape":
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 24
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "truncated":  # an interrupted download: the header promises more than the file holds
        shard = next(d.glob("model-00002*"))
        shard.write_bytes(shard.read_bytes()[:-1000])
    return d


@pytest.mark.parametrize("how,needle", [("no-config", "config.json"), ("no-shard", "shard"),
                                        ("bad-type", "model_type"), ("bad-shape", "shape"),
                                        ("truncated", "lies outside the file")])
def test_bad_models(tiny_model_factory, tmp_path, capsys, med_data, how, needle):
    d = _broken_model(tiny_model_factory("shared"), tmp_path, how)
    for streaming in ("on", "off"):
        code, _, err = run(["eval", d, "--data", med_data, "--streaming", streaming], capsys)
        assert_clean_error(code, err, needle)


def test_bad_data(tiny_model_factory, tmp_path, capsys):
    m = tiny_model_factory("shared")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    for path, needle in ((empty, "empty"), (bad, "bad.jsonl:2"), (nofield, "no text field"),
                         (tmp_path / "missing.jsonl", "no such")):
        code, _, err = run(["eval", m, "--data", path], capsys)
        assert_clean_error(code, err, needle)


def test_bad_budgets_and_foreign_profiles(tiny_model_factory, tmp_path, capsys, med_data, monkeypatch):
    a, b = tiny_model_factory("shared"), tiny_model_factory("shared", seed=1)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["profile", med_data, "--model", a, "-o", "a.profile.safetensors"], capsys)
    assert code == 0, err
    for budget, needle in (("0%", "0%"), ("150%", "100%"), ("2", "below top-k"), ("lots", "not a number")):
        code, _, err = run(["prune", "--budget", budget, "--no-gguf"], capsys)
        assert_clean_error(code, err, needle)
    code, _, err = run(["prune", "--model", b, "--no-gguf"], capsys)
    assert_clean_error(code, err, "another model")
    assert not any(p.name.startswith(("slim", ".slim")) for p in tmp_path.iterdir())


def test_interrupted_prune_leaves_nothing(tiny_model_factory, tmp_path, med_data, monkeypatch):
    from emo_cli.model import checkpoint
    from emo_cli.experts.pipeline import run_profile
    from emo_cli.experts.slim_hf import prune_to_dir
    from emo_cli.runtime import load_model
    from emo_cli.experts.selection import Budget, score_plan

    m = tiny_model_factory("shared")
    prof = run_profile(load_model(m), [str(med_data)], seq_len=64, quiet=True)
    plan = score_plan([prof], "frequency", Budget.parse("4"), "uniform", 3)
    calls = {"n": 0}
    real_add = checkpoint.ShardWriter.add

    def flaky_add(self, name, t):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real_add(self, name, t)

    monkeypatch.setattr(checkpoint.ShardWriter, "add", flaky_add)
    with pytest.raises(KeyboardInterrupt):
        prune_to_dir(m, plan, tmp_path / "slim")
    assert list(tmp_path.iterdir()) == []


def test_console_script_reports_one_line(tmp_path):
    exe = Path(sys.executable).parent / "emo"
    r = subprocess.run([str(exe), "info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no such model" in r.stderr


def test_prune_report_guard_and_budget_search(tiny_model_factory, tmp_path, capsys, monkeypatch):
    from emo_cli.data.documents import read_documents
    from emo_cli.evaluation.loss import evaluate_loss
    from emo_cli.runtime import load_model

    model = tiny_model_factory("plain")
    med = write_jsonl(tmp_path / "med.jsonl", sample_texts(40, seed=21))
    code_data = write_jsonl(tmp_path / "code.jsonl", sample_texts(10, seed=22))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["profile", med, "--model", model, "--heldout-frac", "0.3"], capsys)
    assert code == 0, err
    code, out, err = run(["prune", "--guard", code_data, "--max-loss-increase", "3%", "--no-gguf", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    search = r["budget_search"]
    chosen = search["chosen_keep"]
    tried = {int(k): v for k, v in search["tried"].items()}
    assert tried[chosen] <= 3.0 and all(v > 3.0 for k, v in tried.items() if k < chosen)
    # the report's guard numbers are the real losses of the full and the slim model
    slim = load_model(tmp_path / "slim-med")
    full = load_model(model)
    docs = read_documents([str(code_data)])
    g = r["eval"][str(code_data)]
    assert abs(g["before"] - evaluate_loss(full.model, full.tokenizer, docs, seq_len=2048).loss) < 1e-5
    assert abs(g["after"] - evaluate_loss(slim.model, slim.tokenizer, docs, seq_len=2048).loss) < 1e-5
    saved = json.loads((tmp_path / "slim-med" / "report.json").read_text())
    assert saved["eval"] == r["eval"]


def test_degenerate_profile_settings_are_refused_before_loading(tiny_model_factory, tmp_path, capsys, med_data,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tiny_model_factory("shared")
    for flags, needle in ((["--max-tokens", "0"], "--max-tokens must be at least 1"),
                          (["--max-docs", "0"], "--max-docs must be at least 1"),
                          (["--max-docs", "-1"], "--max-docs must be at least 1"),
                          (["--seq-len", "1"], "--seq-len must be at least 2"),
                          (["--heldout-frac", "1"], "--heldout-frac must be in [0, 1)")):
        code, _, err = run(["profile", med_data, "--model", d, *flags], capsys)
        assert_clean_error(code, err, needle)
    assert not list(tmp_path.glob("*.profile.safetensors")) and not (tmp_path / ".emo").exists()


def test_unknown_method_fails_before_the_model_loads(tiny_model_factory, tmp_path, capsys, med_data, monkeypatch):
    import emo_cli.runtime

    monkeypatch.chdir(tmp_path)
    code, _, err = run(["profile", med_data, "--model", tiny_model_factory("shared")], capsys)
    assert code == 0, err
    monkeypatch.setattr(emo_cli.runtime, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code, _, err = run(["prune", "--method", "frequncy", "--no-gguf"], capsys)
    assert_clean_error(code, err, "unknown method 'frequncy'")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tiny_model_factory, tmp_path, capsys, med_data, monkeypatch, umask):
    """Profiles and slim directories get 0666/0777 less the umask, like any file the user makes
    (safetensors and mkdtemp would make them private)."""
    monkeypatch.chdir(tmp_path)
    old = os.umask(umask)
    try:
        code, _, err = run(["profile", med_data, "--model", tiny_model_factory("shared")], capsys)
        assert code == 0, err
        code, _, err = run(["prune", "--budget", "4", "--no-gguf"], capsys)
        assert code == 0, err
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "med.profile.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "slim-med") == 0o777 & ~umask
    for f in (tmp_path / "slim-med").iterdir():
        assert mode(f) == 0o666 & ~umask, f


def test_conflicting_or_unsatisfiable_prune_requests_fail_before_loading(tiny_model_factory, tmp_path, capsys,
                                                                          med_data, monkeypatch):
    import emo_cli.runtime

    monkeypatch.chdir(tmp_path)
    code, _, err = run(["profile", med_data, "--model", tiny_model_factory("shared"), "--heldout-frac", "0"], capsys)
    assert code == 0, err
    monkeypatch.setattr(emo_cli.runtime, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    for args, needle in ((["--budget", "10", "--max-loss-increase", "2%"], "pass one of them"),
                         (["--method", "greedy"], "greedy needs held-out documents"),
                         (["--max-loss-increase", "2%"], "--max-loss-increase needs held-out documents")):
        code, _, err = run(["prune", *args, "--no-gguf"], capsys)
        assert_clean_error(code, err, needle)


def test_non_text_fields_are_refused(tmp_path, capsys, tiny_model_factory):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    code, _, err = run(["profile", bad, "--model", tiny_model_factory("shared"), "-o", tmp_path / "x.safetensors"], capsys)
    assert_clean_error(code, err, "row 2: field 'text' holds int '5', not text")


def test_failed_forced_prune_keeps_the_previous_outputs(tiny_model_factory, tmp_path, capsys, med_data, monkeypatch):
    """A --force run that fails (bad option, or a failure while writing) leaves the previous slim
    directory and GGUF exactly as they were, and no staging leftovers."""
    import emo_cli.gguf.export

    monkeypatch.chdir(tmp_path)
    code, _, err = run(["profile", med_data, "--model", tiny_model_factory("shared")], capsys)
    assert code == 0, err
    code, _, err = run(["prune", "--budget", "4"], capsys)
    assert code == 0, err
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("slim-med*") if p.is_file()}
    before.update({p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "slim-med").iterdir()})

    def unchanged():
        now = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("slim-med*") if p.is_file()}
        now.update({p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "slim-med").iterdir()})
        assert now == before
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slim-med")]

    code, _, err = run(["prune", "--budget", "6", "--force", "--quant", "bogus"], capsys)
    assert_clean_error(code, err, "unknown quant 'bogus'")
    unchanged()

    def broken(*a, **k):
        raise EmoError("disk full")

    monkeypatch.setattr(emo_cli.gguf.export, "export_gguf", broken)
    code, _, err = run(["prune", "--budget", "6", "--force"], capsys)
    assert code == 1 and "disk full" in err
    unchanged()


def test_force_never_replaces_what_emo_did_not_write(tiny_model_factory, tmp_path, capsys, med_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["profile", med_data, "--model", tiny_model_factory("shared")], capsys)
    assert code == 0, err
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    code, _, err = run(["prune", "--budget", "4", "-o", mine, "--force", "--no-gguf"], capsys)
    assert_clean_error(code, err, "not an emo output")
    (tmp_path / "notes.gguf").write_text("not a gguf")
    code, _, err = run(["prune", "--budget", "4", "--gguf", tmp_path / "notes.gguf", "--force"], capsys)
    assert_clean_error(code, err, "not an emo output")
    assert (mine / "thesis.txt").read_text() == "years of work" and len(list(mine.iterdir())) == 1
    assert (tmp_path / "notes.gguf").read_text() == "not a gguf" and not (tmp_path / "slim-med").exists()


def test_profiles_find_their_data_from_anywhere(tiny_model_factory, tmp_path, capsys, med_data, monkeypatch):
    """Profiles record absolute data paths (and a content hash); data moved together with the
    profile is found beside it; missing data is one clear line."""
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    shutil.copy(med_data, a / "med.jsonl")
    monkeypatch.chdir(a)
    code, _, err = run(["profile", "med.jsonl", "--model", tiny_model_factory("shared")], capsys)
    assert code == 0, err
    monkeypatch.chdir(b)
    code, out, err = run(["prune", "-p", "../a/med.profile.safetensors", "--budget", "4", "--no-gguf", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["eval"]["heldout"]["docs"] > 0
    for name in ("med.jsonl", "med.profile.safetensors"):
        shutil.move(a / name, c / name)
    code, out, err = run(["prune", "-p", "../c/med.profile.safetensors", "--budget", "4", "--dry-run", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["eval"]["heldout"]["docs"] > 0
    (c / "med.jsonl").unlink()
    code, _, err = run(["prune", "-p", "../c/med.profile.safetensors", "--budget", "4", "--dry-run"], capsys)
    assert_clean_error(code, err, "the profiled data is not there")


def test_leftovers_of_killed_runs_are_cleaned(tiny_model_factory, tmp_path, capsys, med_data, monkeypatch):
    """Staging files of a killed prune/export (their pid is gone) are removed by the next run;
    those of a live process are not."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["profile", med_data, "--model", tiny_model_factory("shared")], capsys)
    assert code == 0, err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".slim-med.{dead.pid}.abc123", tmp_path / f".slim-med.gguf.{dead.pid}.tmp",
             tmp_path / f".slim-med.{dead.pid}.new.gguf"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"x" * 1000)
    stale[1].write_bytes(b"GGUF")
    stale[2].write_bytes(b"GGUF")
    live = tmp_path / f".slim-med.gguf.{os.getppid()}.tmp"
    live.write_bytes(b"GGUF")
    code, _, err = run(["prune", "--budget", "4"], capsys)
    assert code == 0, err
    assert not any(p.exists() for p in stale) and live.exists()


@pytest.mark.parametrize("state", ["{not json", "[]", "\udcff"])
def test_corrupt_workspace_fails_before_any_output(tiny_model_factory, tmp_path, capsys, med_data, monkeypatch, state):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".emo").mkdir()
    (tmp_path / ".emo" / "state.json").write_bytes(state.encode("utf-8", "surrogateescape"))
    code, _, err = run(["profile", med_data, "--model", tiny_model_factory("shared")], capsys)
    assert_clean_error(code, err, "corrupt workspace state")
    assert not list(tmp_path.glob("*.profile.safetensors"))


def test_profile_and_eval_open_each_model_once(tiny_model_factory, tmp_path, capsys, monkeypatch, model_opens):
    model = tiny_model_factory("shared")
    write_jsonl(tmp_path / "med.jsonl", sample_texts(12, seed=3))
    code, _, err = run(["profile", "med.jsonl", "--model", model, "--seq-len", "64"], capsys, tmp_path, monkeypatch)
    assert code == 0, err
    assert model_opens[model.resolve()] == 1, model_opens
    code, _, err = run(["eval", model, "--data", "med.jsonl", "--seq-len", "64"], capsys, tmp_path, monkeypatch)
    assert code == 0, err
    assert model_opens[model.resolve()] == 2, model_opens  # one more for the eval command

