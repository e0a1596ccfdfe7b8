"""Layer-streamed passes equal the resident model's, the planner chooses and refuses as it says,
and streaming really holds one layer: peak anonymous memory measured in a subprocess."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import reference_emo
from emo_cli.data.documents import Document, read_documents
from emo_cli.errors import EmoError
from emo_cli.evaluation.loss import evaluate_loss
from emo_cli.model.loading import open_hf_dir
from emo_cli.model.memory import GiB, Workload, estimate, plan_memory, weight_counts
from emo_cli.model.api import masks_for
from emo_cli.evaluation.multiple_choice import MCItem, evaluate_mc
from emo_cli.experts.pipeline import batches_for, heldout_documents, run_profile
from emo_cli.experts.usage_profile import STATS, Profile, ProfileAccumulator
from emo_cli.runtime import load_model
from emo_cli.experts.search import greedy_plan, router_plan
from emo_cli.experts.selection import Budget, score_plan
from tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def both(d, **kw):
    return load_model(d, streaming="off", **kw), load_model(d, streaming="on", **kw)


def same_profile(a: Profile, b: Profile) -> None:
    for k in STATS + ("tokens",):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.meta == b.meta


def test_planner_streams_single_passes_and_keeps_the_model_for_repeated_ones(tiny_model_factory):
    d = tiny_model_factory("shared")
    resident, streamed = both(d)
    assert type(resident.model).__name__ == "EmoForCausalLM" and not resident.memory.streaming
    assert type(streamed.model).__name__ == "StreamedModel" and streamed.memory.streaming
    assert load_model(d, workload=Workload(passes=1)).memory.streaming  # one read of the weights
    assert not load_model(d, workload=Workload(passes=8)).memory.streaming  # fits: convert once
    assert not load_model(d).memory.streaming  # a model handed to library code: whole


def test_streamed_profile_is_identical(tiny_model_factory, med_data, any_variant, tmp_path):
    d = tiny_model_factory(any_variant)
    resident, streamed = both(d)
    a = run_profile(resident, [str(med_data)], seq_len=64, batch_size=4, quiet=True)
    b = run_profile(streamed, [str(med_data)], seq_len=64, batch_size=4, quiet=True)
    same_profile(a, b)
    a.save(tmp_path / "a.profile.safetensors")
    b.save(tmp_path / "b.profile.safetensors")
    assert (tmp_path / "a.profile.safetensors").read_bytes() == (tmp_path / "b.profile.safetensors").read_bytes()
    # layer-major equals the plain batch-major forward of the whole model, batch after batch
    ref = Profile.empty(a.counts.shape[0], a.counts.shape[1], a.meta)
    acc = ProfileAccumulator(ref, resident.model.expert_ids())
    docs = [d_ for d_ in read_documents([str(med_data)]) if d_.index not in set(a.meta.data.heldout_ids)]
    for batch in batches_for(resident.tokenizer, docs, 64, 4):
        acc.mask = batch.mask.reshape(-1)
        resident.model.hidden_states(batch.ids, observer=acc)
    same_profile(a, ref)
    assert streamed.model.parts_loaded == streamed.model.num_layers  # each layer read once


def test_streamed_losses_equal_and_match_reference(tiny_model_factory, med_data, any_variant):
    d = tiny_model_factory(any_variant)
    resident, streamed = both(d)
    docs = read_documents([str(med_data)])[:12]
    prof = run_profile(resident, [str(med_data)], seq_len=64, batch_size=4, quiet=True)
    k = resident.config.num_experts_per_tok
    plan = score_plan([prof], "reap", Budget.parse(str(k + 1)), "uniform", k)
    for kept in (None, plan.kept):
        a = evaluate_loss(resident.model, resident.tokenizer, docs, seq_len=64, batch_size=4,
                          masks=masks_for(resident.model, kept))
        b = evaluate_loss(streamed.model, streamed.tokenizer, docs, seq_len=64, batch_size=4,
                          masks=masks_for(streamed.model, kept))
        assert abs(a.loss - b.loss) <= 1e-6 * abs(a.loss)
        assert (a.tokens, a.docs, a.bytes) == (b.tokens, b.docs, b.bytes)
    # and the masked streamed loss is the float64 reference's, routing masked to the kept ids
    cfg, T = reference_emo.load_tensors(d)
    ids = [streamed.tokenizer.encode(x.text)[:64] for x in docs[:3]]
    ref = sum(reference_emo.doc_nll(cfg, T, i, keep=plan.kept) for i in ids) / sum(len(i) - 1 for i in ids)
    got = evaluate_loss(streamed.model, streamed.tokenizer, docs[:3], seq_len=64,
                        masks=masks_for(streamed.model, plan.kept)).loss
    assert abs(got - ref) / ref < 1e-5


def test_expert_kernels_in_token_chunks_change_nothing_but_rounding(tiny_model_factory, med_data, monkeypatch):
    """Long batches run the experts in chunks of MOE_CHUNK_TOKENS tokens: routing is per token, so
    counts are equal and everything else agrees to fp32 rounding."""
    import emo_cli.arch.layers as emo_mod

    lm = load_model(tiny_model_factory("always_active"))
    docs = read_documents([str(med_data)])
    whole = run_profile(lm, [str(med_data)], seq_len=64, batch_size=8, quiet=True)
    loss = evaluate_loss(lm.model, lm.tokenizer, docs, seq_len=64, batch_size=8).loss
    monkeypatch.setattr(emo_mod, "MOE_CHUNK_TOKENS", 7)
    chunked = run_profile(lm, [str(med_data)], seq_len=64, batch_size=8, quiet=True)
    assert torch.equal(whole.counts, chunked.counts) and torch.equal(whole.tokens, chunked.tokens)
    for k in ("prob", "reap", "easyep"):
        assert torch.allclose(getattr(whole, k), getattr(chunked, k), rtol=1e-5), k
    assert abs(evaluate_loss(lm.model, lm.tokenizer, docs, seq_len=64, batch_size=8).loss - loss) < 1e-5 * loss


def test_spilled_hidden_states_change_nothing(tiny_model_factory, med_data):
    d = tiny_model_factory("gqa")
    resident, streamed = both(d)
    streamed.model.activation_budget = 0  # every hidden state goes through the temporary file
    docs = read_documents([str(med_data)])
    a = evaluate_loss(resident.model, resident.tokenizer, docs, seq_len=64, batch_size=4)
    b = evaluate_loss(streamed.model, streamed.tokenizer, docs, seq_len=64, batch_size=4)
    assert a.loss == b.loss
    same_profile(run_profile(resident, [str(med_data)], seq_len=64, batch_size=4, quiet=True),
                 run_profile(streamed, [str(med_data)], seq_len=64, batch_size=4, quiet=True))


def test_streamed_router_and_greedy_plans_equal(tiny_model_factory, med_data, any_variant):
    resident, streamed = both(tiny_model_factory(any_variant))
    prof = run_profile(resident, [str(med_data)], seq_len=64, batch_size=4, heldout_frac=0.25, quiet=True)
    calib = batches_for(resident.tokenizer, read_documents([str(med_data)])[:16], 64, 4)
    held = batches_for(resident.tokenizer, heldout_documents([prof]), 64, 4)
    k = resident.config.num_experts_per_tok
    b = Budget.parse(str(k + 1))
    r1 = router_plan(resident.model, calib, [prof], b, "uniform", k)
    r2 = router_plan(streamed.model, calib, [prof], b, "uniform", k)
    assert r1.kept == r2.kept and r1.scores == r2.scores
    g1 = greedy_plan(resident.model, calib, held, [prof], b, "uniform", k, max_evals=12)
    streamed.model.activation_budget = 0  # candidates replicated through the spill file too
    g2 = greedy_plan(streamed.model, calib, held, [prof], b, "uniform", k, max_evals=12)
    assert g1.kept == g2.kept and g1.extra == g2.extra


def test_streamed_multiple_choice_equal(tiny_model_factory):
    resident, streamed = both(tiny_model_factory("per_layer"))
    items = [MCItem("The patient was given a dose of", ["aspirin", "theorem", "lambda"], 0),
             MCItem("def return", ["value", "the doctor ordered tests"], 1)]
    assert evaluate_mc(resident.model, resident.tokenizer, items) == evaluate_mc(streamed.model, streamed.tokenizer, items)


@pytest.mark.parametrize("stop_at", [(1, 0), (1, 2), (2, 1)])
def test_interrupted_streamed_profile_resumes_to_the_same_bytes(tiny_model_factory, med_data, tmp_path,
                                                                 monkeypatch, stop_at):
    """Killed mid-layer (at layer, batch = stop_at), then run again: the run continues from the
    last finished layer and the profile equals an uninterrupted run exactly."""
    import emo_cli.experts.usage_profile as profile_mod

    d = tiny_model_factory("dense_lead")
    resident, first = both(d)
    want = run_profile(resident, [str(med_data)], seq_len=64, batch_size=4, quiet=True)
    folder = tmp_path / "med.profile.safetensors.partial"

    class Killed(Exception):
        pass

    original = profile_mod.run_layers

    def dying(*a, on_step=None, **kw):
        def step(layer, b):
            if (layer, b) == stop_at:
                raise Killed
            on_step(layer, b)
        return original(*a, on_step=step, **kw)

    monkeypatch.setattr(profile_mod, "run_layers", dying)
    with pytest.raises(Killed):
        run_profile(first, [str(med_data)], seq_len=64, batch_size=4, quiet=True, resume_dir=folder)
    monkeypatch.setattr(profile_mod, "run_layers", original)
    assert json.loads((folder / "state.json").read_text())["next_layer"] == stop_at[0]
    again = load_model(d, streaming="on")
    prof = run_profile(again, [str(med_data)], seq_len=64, batch_size=4, quiet=True, resume_dir=folder)
    assert again.model.parts_loaded == again.model.num_layers - stop_at[0]  # finished layers not redone
    same_profile(prof, want)
    assert not folder.exists()


def test_in_memory_profile_checkpoints_every_n_documents_and_resumes_to_the_same_bytes(
        tiny_model_factory, med_data, tmp_path, monkeypatch):
    """A resident model's run saves its partial sums every --checkpoint-every documents; killed in
    the third group, it resumes after the second, and the profile equals an uncheckpointed run."""
    import emo_cli.experts.usage_profile as profile_mod

    d = tiny_model_factory("shared")
    lm = load_model(d)
    want = run_profile(lm, [str(med_data)], seq_len=64, batch_size=4, quiet=True)
    folder = tmp_path / "med.profile.safetensors.partial"
    same_profile(run_profile(lm, [str(med_data)], seq_len=64, batch_size=4, quiet=True, resume_dir=folder,
                             checkpoint_docs=8), want)  # checkpointing alone changes nothing
    assert not folder.exists()

    class Killed(Exception):
        pass

    original, groups = profile_mod.run_layers, []

    def dying(*a, **kw):
        groups.append(1)
        if len(groups) == 3:
            raise Killed
        return original(*a, **kw)

    monkeypatch.setattr(profile_mod, "run_layers", dying)
    with pytest.raises(Killed):
        run_profile(lm, [str(med_data)], seq_len=64, batch_size=4, quiet=True, resume_dir=folder, checkpoint_docs=8)
    monkeypatch.setattr(profile_mod, "run_layers", original)
    assert json.loads((folder / "state.json").read_text())["next_batch"] == 4  # two groups of 2 batches saved
    calls = []
    monkeypatch.setattr(profile_mod, "run_layers", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    prof = run_profile(lm, [str(med_data)], seq_len=64, batch_size=4, quiet=True, resume_dir=folder,
                       checkpoint_docs=8)
    total = -(-want.meta.data.docs // 4)  # batches
    assert len(calls) == -(-(total - 4) // 2)  # only the groups after the checkpoint ran again
    same_profile(prof, want)
    assert not folder.exists()


def test_planner_choice_and_refusal_under_a_small_limit(tiny_model_factory):
    files = open_hf_dir(tiny_model_factory("shared"))
    work = Workload(batch_size=4, seq_len=64)
    full = plan_memory(files, "cpu", None, "off", 100.0, work)
    part = plan_memory(files, "cpu", None, "on", 100.0, work)
    assert part.weights < full.weights and part.need < full.need
    between = (part.need + full.need) / 2 / GiB
    chosen = plan_memory(files, "cpu", None, "auto", between, work)
    assert chosen.streaming and chosen.dtype == torch.float32
    assert not plan_memory(files, "cpu", None, "auto", full.need / GiB + 0.01, work).streaming
    assert plan_memory(files, "cpu", None, "auto", 100.0, Workload(4, 64, passes=1)).streaming
    with pytest.raises(EmoError, match=r"needs \d+\.\d GiB \(layer by layer in float32\), --max-memory allows 0\.1 GiB"):
        plan_memory(files, "cpu", None, "auto", 0.1, work)
    with pytest.raises(EmoError, match="--streaming on holds one layer"):
        plan_memory(files, "cpu", None, "off", part.need / GiB, work)
    with pytest.raises(EmoError, match="cannot stream"):
        plan_memory(files, "cpu", None, "on", 10.0, Workload(1, 64, 64, streamable=False))


def test_planner_keeps_bf16_when_fp32_does_not_fit(tmp_path):
    d = write_tiny_model(tmp_path / "bf16", "shared", dtype=np.float32)
    # rewrite as bf16 through emo's own writer: the checkpoint dtype decides the fallback
    from emo_cli.model.loading import load_hf_model, save_hf_model

    model, _ = load_hf_model(d)
    save_hf_model(model, tmp_path / "m", dtype=torch.bfloat16, tokenizer_dir=d)
    files = open_hf_dir(tmp_path / "m")
    work = Workload(batch_size=4, seq_len=64)
    counts = weight_counts(files)
    fp32 = plan_memory(files, "cpu", None, "on", 100.0, work)
    w16, act16, _ = estimate(files.config, counts, torch.bfloat16, True, work)
    bf16_need = fp32.need - fp32.weights - fp32.activations + w16 + act16
    plan = plan_memory(files, "cpu", None, "on", (bf16_need + fp32.need) / 2 / GiB, work)
    assert plan.dtype == torch.bfloat16 and plan.streaming
    lm = load_model(tmp_path / "m", streaming="on", max_memory=(bf16_need + fp32.need) / 2 / GiB,
                    workload=work)
    assert lm.model.dtype == torch.bfloat16
    docs = [Document("the patient was given a dose of aspirin", "x", 0)]
    assert np.isfinite(evaluate_loss(lm.model, lm.tokenizer, docs, seq_len=64).loss)


def test_cli_streaming_flags_and_refusal(tiny_model_factory, med_data, tmp_path, monkeypatch, capsys):
    from test_cli import assert_clean_error, run

    d = tiny_model_factory("shared")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["profile", med_data, "--model", d, "--streaming", "on", "--seq-len", "64", "--json"], capsys)
    assert code == 0, err
    code, _, err = run(["eval", d, "--data", med_data, "--max-memory", "0.1"], capsys)
    assert_clean_error(code, err, "needs 1.0 GiB (layer by layer in float32), --max-memory allows 0.1 GiB")
    code, _, err = run(["profile", med_data, "--model", d, "--streaming", "sometimes", "--force"], capsys)
    assert_clean_error(code, err, "--streaming")
    code, out, err = run(["prune", "--budget", "4", "--no-gguf", "--streaming", "on", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["eval"]["heldout"]["after"] > 0
    searched = {}
    for mode in ("on", "off"):  # the budget search's repeated passes, streamed or resident
        code, out, err = run(["prune", "--max-loss-increase", "50%", "--dry-run", "--streaming", mode, "--json"], capsys)
        assert code == 0, err
        r = json.loads(out)
        assert r["memory"]["streaming"] == (mode == "on")
        searched[mode] = (r["budget_search"], r["plan"])
    assert searched["on"] == searched["off"]


MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    from emo_cli.experts.pipeline import run_profile
    from emo_cli.runtime import load_model

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    torch.set_num_threads(1)
    from emo_cli.data.documents import read_documents
    read_documents([sys.argv[2]])  # datasets/pyarrow set themselves up: not the model's memory
    base = anon()
    peak = [base]
    done = False
    def sample():
        while not done:
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    lm = load_model(sys.argv[1], streaming=sys.argv[3])
    run_profile(lm, [sys.argv[2]], seq_len=64, batch_size=4, quiet=True)
    done = True
    t.join()
    print(json.dumps({"base": base, "peak": max(peak[0], anon())}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RssAnon is read from Linux's /proc")
def test_streaming_holds_one_layer_of_anonymous_memory(tmp_path, med_data):
    """A 6-layer model of ~100 MB per layer (fp32): streamed profiling stays below one layer plus
    the embeddings, activations and a margin; the resident run holds all six."""
    d = write_tiny_model(tmp_path / "wide", "shared", overrides=dict(
        hidden_size=512, intermediate_size=512, num_experts=32, num_experts_per_tok=4,
        num_attention_heads=8, num_hidden_layers=6))
    counts = weight_counts(open_hf_dir(d))
    layer_bytes = counts.largest_layer * 4
    assert layer_bytes > 90e6
    peaks = {}
    for mode in ("on", "off"):
        r = subprocess.run([sys.executable, "-c", MEASURE, str(d), str(med_data), mode],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        m = json.loads(r.stdout.strip().splitlines()[-1])
        peaks[mode] = m["peak"] - m["base"]
    embed_bytes = counts.embed * 4 + counts.head * 4
    assert peaks["on"] < layer_bytes + embed_bytes + 120e6, peaks
    assert peaks["off"] > 5 * layer_bytes, peaks
    assert peaks["on"] < peaks["off"] / 3, peaks
