"""lm-eval on emo's runtime: a local task YAML over a local JSONL (offline). Its accuracy equals
`emo eval`'s multiple-choice accuracy on the same items, and its loglikelihoods equal emo's
per-choice scores, for an HF directory and a GGUF file."""

from __future__ import annotations

import json
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from emo_cli.cli import app as cli  # noqa: E402
from emo_cli.gguf.export import export_gguf  # noqa: E402
from emo_cli.evaluation.multiple_choice import choice_logprobs, evaluate_mc, read_mc_items  # noqa: E402
from emo_cli.runtime import load_model  # noqa: E402

ROWS = [
    {"question": "The patient was given a dose of", "choices": ["aspirin", "theorem", "lambda"], "answer": 0},
    {"question": "def return", "choices": ["value", "the doctor ordered tests"], "answer": 0},
    {"question": "license permission granted", "choices": ["warranty", "unto them", "sum of squares"], "answer": 2},
    {"question": "he said unto", "choices": ["them", "print", "integral"], "answer": 2},
    {"question": "Acute bronchitis is an", "choices": ["infection", "iterator", "covenant"], "answer": 0},
]
TASK = """task: emo_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm-eval-task")
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "emo_local_mc.yaml").write_text(TASK.format(data=d / "mc.jsonl"))
    return d


def run_task(model: str, task_dir):
    from lm_eval.tasks import TaskManager

    import emo_cli.evaluation.lm_eval_model  # noqa: F401  (registers the `emo` model)

    return lm_eval.simple_evaluate(model="emo", model_args=f"pretrained={model}", tasks=["emo_local_mc"],
                                   task_manager=TaskManager(include_path=str(task_dir)), num_fewshot=0,
                                   log_samples=True, verbosity="ERROR")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_lm_eval_task_equals_emo_eval(tiny_model_factory, tmp_path, task_dir, kind):
    model = tiny_model_factory("shared")
    if kind == "gguf":
        model = export_gguf(model, tmp_path / "m.gguf", "f32")["output"]
    res = run_task(str(model), task_dir)
    items = read_mc_items(str(task_dir / "mc.jsonl"))
    lm = load_model(str(model))
    ours = evaluate_mc(lm.model, lm.tokenizer, items)
    assert res["results"]["emo_local_mc"]["acc,none"] == ours["acc"]
    assert res["results"]["emo_local_mc"]["acc_norm,none"] == ours["acc_norm"]
    scores = choice_logprobs(lm.model, lm.tokenizer, items, 2048)
    for sample in res["samples"]["emo_local_mc"]:
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx(scores[sample["doc_id"]], rel=1e-6, abs=1e-6)


def test_rolling_loglikelihood_and_generation_are_emo_forwards():
    from lm_eval.api.instance import Instance

    from emo_cli.evaluation.lm_eval_model import EmoLM
    from emo_cli.model.loading import EMBEDDED_MODELS

    model = EMBEDDED_MODELS["tiny-emo"]  # trained: greedy choices are not near-ties of random weights
    elm = EmoLM(str(model), max_length=16)
    text = "The patient was given a dose of aspirin for acute pain and the doctor ordered tests " * 2
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    (total,) = elm.loglikelihood_rolling([req])
    lm = load_model(str(model))
    ids = [elm.eot] + lm.tokenizer.encode(text)
    expect = 0.0
    for start in range(0, len(ids) - 1, 16):  # disjoint windows of 16 predicted tokens, plain forwards
        w = torch.tensor([ids[start:start + 17]])
        logp = torch.log_softmax(lm.model(w[:, :-1]).double(), -1)[0]
        expect += float(logp[torch.arange(w.shape[1] - 1), w[0, 1:]].sum())
    assert total == pytest.approx(expect, rel=1e-6)

    gen = Instance("generate_until", {}, ("The patient was", {"until": ["\n"], "max_gen_toks": 6}), 0)
    (out,) = elm.generate_until([gen])
    ctx = lm.tokenizer.encode("The patient was")
    greedy = []
    for _ in range(6):  # an independent greedy loop over full forwards
        nxt = int(lm.model(torch.tensor([ctx + greedy]))[0, -1].argmax())
        if nxt in lm.config.eos_ids:
            break
        greedy.append(nxt)
    assert out == lm.tokenizer.decode(greedy).split("\n")[0]


@pytest.mark.slow
def test_emo_eval_tasks_uses_the_same_model(tiny_model_factory, task_dir, monkeypatch, capsys):
    model = tiny_model_factory("shared")
    monkeypatch.setattr(sys, "argv", ["emo", "eval", str(model), "--tasks", "emo_local_mc", "--include-path",
                                      str(task_dir), "--json"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert not done.value.code
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tasks"]
    acc = next(r["value"] for r in rows if r["metric"] == "acc")
    lm = load_model(str(model))
    assert acc == evaluate_mc(lm.model, lm.tokenizer, read_mc_items(str(task_dir / "mc.jsonl")))["acc"]


@pytest.mark.slow
def test_lm_evals_own_command_line_with_emo_registered(task_dir, tmp_path):
    import subprocess

    from emo_cli.model.loading import EMBEDDED_MODELS

    model = EMBEDDED_MODELS["tiny-emo"]
    r = subprocess.run([sys.executable, "-m", "emo_cli.evaluation.lm_eval_model", "--model", "emo", "--model_args",
                        f"pretrained={model}", "--tasks", "emo_local_mc", "--include_path", str(task_dir),
                        "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (result_file,) = (tmp_path / "out").rglob("results*.json")
    acc = json.loads(result_file.read_text())["results"]["emo_local_mc"]["acc,none"]
    lm = load_model(str(model))
    assert acc == evaluate_mc(lm.model, lm.tokenizer, read_mc_items(str(task_dir / "mc.jsonl")))["acc"]
