"""Data-parallel passes under torchrun (Gloo on CPU): two and three processes give the profile,
the losses, the multiple-choice accuracy and the greedy plan of one process; only rank 0 writes;
a failing rank ends every rank with one line naming it and leaves no output.

Both sides run with one thread per process (torchrun's default), so every batch's fp32 arithmetic
is the same and the results agree to float64 summation order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emo_cli.experts.usage_profile import Profile
from tiny_models import sample_texts, write_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "EMO_MODEL": "", "PYTHONPATH": str(ROOT)}


def emo(cwd, *args, procs: int = 1, script: list[str] | None = None):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    cmd = (launch + (script or ["-m", "emo_cli"]) if procs > 1 else [sys.executable, "-m", "emo_cli"]) + list(map(str, args))
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)


def ok(r) -> None:
    """A torchrun run succeeded; else show its first lines (the failing rank's own report comes
    before torchrun's summary)."""
    assert r.returncode == 0, r.stderr[:3000]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_factory):
    d = tmp_path_factory.mktemp("dp")
    write_jsonl(d / "med.jsonl", sample_texts(45, seed=21))
    write_jsonl(d / "held.jsonl", sample_texts(13, seed=22))
    rows = [{"question": t, "choices": ["aspirin", "lambda", "covenant"], "answer": i % 3}
            for i, t in enumerate(sample_texts(11, seed=23, words_per_doc=(3, 8)))]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_model_factory("shared")
    r = emo(d, "profile", "med.jsonl", "--model", model, "--seq-len", "48", "--batch-size", "4", "-o", "one.profile.safetensors")
    assert r.returncode == 0, r.stderr
    return d, model


@pytest.mark.parametrize("procs", [2, 3])
def test_profile_and_eval_equal_one_process(work, procs):
    d, model = work
    out = f"dp{procs}.profile.safetensors"
    r = emo(d, "profile", "med.jsonl", "--model", model, "--seq-len", "48", "--batch-size", "4", "-o", out, procs=procs)
    ok(r)
    one, many = Profile.load(d / "one.profile.safetensors"), Profile.load(d / out)
    assert torch.equal(one.counts, many.counts) and torch.equal(one.tokens, many.tokens)
    for name in ("prob", "reap", "easyep"):
        assert torch.allclose(getattr(one, name), getattr(many, name), rtol=1e-9, atol=0), name
    assert one.meta.data == many.meta.data

    args = ["eval", model, "--data", "held.jsonl", "--data", "mc.jsonl", "--seq-len", "48", "--json"]
    single, multi = emo(d, *args), emo(d, *args, procs=procs)
    ok(multi)
    a, b = (json.loads(x.stdout.strip().splitlines()[-1])["results"] for x in (single, multi))
    assert [r["data"] for r in a] == [r["data"] for r in b]
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-12) and a[0]["tokens"] == b[0]["tokens"]
    assert a[1]["acc"] == b[1]["acc"] and a[1]["acc_norm"] == b[1]["acc_norm"]


def test_greedy_plan_equals_one_process_and_only_rank_0_writes(work):
    d, model = work
    args = ["prune", "-p", "one.profile.safetensors", "--budget", "50%", "--method", "greedy", "--max-evals", "6",
            "--no-gguf", "--json"]
    single = emo(d, *args, "-o", "g1")
    before = sorted(p.name for p in d.iterdir())
    multi = emo(d, *args, "-o", "g2", procs=2)
    ok(single)
    ok(multi)
    assert json.loads((d / "g1" / "plan.json").read_text())["kept"] == json.loads((d / "g2" / "plan.json").read_text())["kept"]
    assert sorted(p.name for p in d.iterdir()) == sorted(before + ["g2"])  # one output, written once


FAILING = r"""
import os, sys
import emo_cli.experts.usage_profile as profile
real = profile.profile_model
def failing(*a, **k):
    if os.environ["RANK"] == "1":
        raise RuntimeError("injected failure")
    return real(*a, **k)
profile.profile_model = failing
import emo_cli.experts.pipeline as pipeline
pipeline.profile_model = failing
from emo_cli.cli.app import main
sys.argv = ["emo", *sys.argv[1:]]
main()
"""


def test_a_failing_rank_ends_all_ranks_cleanly(work, tmp_path):
    d, model = work
    (tmp_path / "failing.py").write_text(FAILING)
    r = emo(d, "profile", "med.jsonl", "--model", model, "--seq-len", "48", "-o", "fail.profile.safetensors",
            procs=2, script=[str(tmp_path / "failing.py")])
    assert r.returncode != 0
    assert "error: rank 1: RuntimeError: injected failure" in r.stderr
    assert "Traceback" not in "\n".join(ln for ln in r.stderr.splitlines() if "rank 1" in ln)
    assert not (d / "fail.profile.safetensors").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".fail")]


def test_streamed_data_parallel_profile_checkpoints_per_rank_and_equals_one_process(work):
    d, model = work
    r = emo(d, "profile", "med.jsonl", "--model", model, "--seq-len", "48", "--batch-size", "4", "--streaming", "on",
            "-o", "streamed.profile.safetensors", procs=2)
    ok(r)
    one, many = Profile.load(d / "one.profile.safetensors"), Profile.load(d / "streamed.profile.safetensors")
    assert torch.equal(one.counts, many.counts)
    assert torch.allclose(one.reap, many.reap, rtol=1e-9, atol=0)
    assert not (d / "streamed.profile.safetensors.partial").exists()


def test_ctrl_c_on_the_launcher_stops_every_rank(work, tmp_path):
    import signal
    import time

    d, model = work
    write_jsonl(tmp_path / "long.jsonl", sample_texts(3000, seed=5, words_per_doc=(40, 80)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "emo_cli",
              "profile", str(tmp_path / "long.jsonl"), "--model", str(model), "--seq-len", "64", "-o", "cut.profile.safetensors"]
    proc = subprocess.Popen(launch, cwd=d, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    partial = d / "cut.profile.safetensors.partial"
    deadline = time.monotonic() + 240
    while not all((partial / f"rank-{r}-of-2").exists() for r in (0, 1)):  # both ranks are in the pass
        assert proc.poll() is None and time.monotonic() < deadline, "the ranks never started their pass"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the launcher's terminal sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # a rank in the pass says so in one line; one already waiting in a collective cannot run Python
    # until torchrun's SIGKILL (after its grace period) ends it: stopped either way
    ours = [ln for ln in err.splitlines() if ln.startswith("error: rank")]
    assert all(ln in ("error: rank 0: interrupted", "error: rank 1: interrupted") for ln in ours), ours
    assert not (d / "cut.profile.safetensors").exists()
    assert subprocess.run(["pgrep", "-f", "cut.profile.safetensors"], capture_output=True).stdout == b""


DYING = r"""
import os, sys
import emo_cli.experts.usage_profile as profile
real, calls = profile.run_layers, []
def dying(*a, **k):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        raise RuntimeError("killed in its third group")
    return real(*a, **k)
profile.run_layers = dying
from emo_cli.cli.app import main
sys.argv = ["emo", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("streaming,saved", [("off", ("next_batch", 2)), ("on", ("next_layer", 2))])
def test_an_interrupted_data_parallel_profile_resumes_per_rank(work, tmp_path, streaming, saved):
    """In memory, each rank saves its sums every --checkpoint-every documents; streamed, after every
    layer. Rank 1 dies in its third group (or layer); the same command then finishes the run."""
    d, model = work
    (tmp_path / "dying.py").write_text(DYING)
    args = ["profile", "med.jsonl", "--model", model, "--seq-len", "48", "--batch-size", "4", "--checkpoint-every", "4",
            "--streaming", streaming, "-o", "resumed.profile.safetensors", "--force"]
    first = emo(d, *args, procs=2, script=[str(tmp_path / "dying.py")])
    assert first.returncode != 0 and "error: rank 1: RuntimeError: killed in its third group" in first.stderr
    state = json.loads((d / "resumed.profile.safetensors.partial" / "rank-1-of-2" / "state.json").read_text())
    assert state[saved[0]] == saved[1]  # rank 1 saved its first two groups (or layers)
    again = emo(d, *args, procs=2)
    ok(again)
    one, many = Profile.load(d / "one.profile.safetensors"), Profile.load(d / "resumed.profile.safetensors")
    assert torch.equal(one.counts, many.counts)
    for name in ("prob", "reap", "easyep"):
        assert torch.allclose(getattr(one, name), getattr(many, name), rtol=1e-9, atol=0), name
    assert not (d / "resumed.profile.safetensors.partial").exists()
