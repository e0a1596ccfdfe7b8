"""`emo demo`: the whole pipeline, offline, on emo's embedded tiny EMO model.

Steps (all output under --out, default ./emo-demo):
  1. build medical/code/legal document data from pip-installed sources (corpus.PIP_DOMAINS)
  2. profile the tiny EMO on the medical training documents
  3. prune it to 25% of the experts and export a Q8_0 GGUF
  4. held-out medical loss: full vs slim vs a random 25% subset vs the tiny standard MoE
     (full, and pruned the same way), plus the slim model on the other domains as guards
  5. a one-shot greedy completion from the slim GGUF, on emo's own CPU kernels
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from emo_cli import ui
from emo_cli.errors import EmoError
from emo_cli.experts.methods import DEFAULT_METHOD
from emo_cli.model.loading import EMBEDDED_MODELS

TINY_EMO, TINY_STD = EMBEDDED_MODELS["tiny-emo"], EMBEDDED_MODELS["tiny-stdmoe"]
MARKER = ".emo-demo"
# a line of a held-out ICD-10 document (never trained on): the model continues the code list
PROMPT = "S91.153 Open bite of unspecified great toe without damage to nail\n"


@dataclass
class DemoSettings:
    out: Path = Path("emo-demo")
    budget: str = "25%"
    method: str = DEFAULT_METHOD  # a name in experts/methods.py
    profile_docs: int = 64
    eval_docs: int = 32
    guard_docs: int = 16
    seq_len: int = 512
    new_tokens: int = 24
    force: bool = False
    quiet: bool = False


def _prepare_out(s: DemoSettings) -> None:
    if s.out.exists() and not (s.out / MARKER).exists() and any(s.out.iterdir()) and not s.force:
        raise EmoError(f"{s.out} exists and was not written by `emo demo` (pass --force or --out another dir)")
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / MARKER).write_text("written by emo demo; safe to delete\n")


# what `emo demo --data-only` writes under <out>/data/, from the demo corpus' (domain, split)
DATA_FILES = {"med.jsonl": ("medical", 0), "med-heldout.jsonl": ("medical", 1), "code.jsonl": ("code", 0),
              "law.jsonl": ("legal", 0)}


def write_demo_data(out: Path, force: bool = False) -> list[Path]:
    """The demo's text as plain JSONL files in <out>/data/ (med.jsonl, ...), from pip-installed
    sources and in seconds, so the README's three commands run as printed with EMO_MODEL=tiny-emo."""
    import shutil
    import tempfile

    from emo_cli.lab.corpus import PIP_DOMAINS, CorpusSpec, build_corpus, domain_files
    from emo_cli.outputs import check_location, follow_umask

    data = Path(out) / "data"
    targets = [data / name for name in DATA_FILES]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise EmoError(f"{existing[0]} exists (pass --force to overwrite)")
    check_location(data)
    data.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data, prefix=".emo-demo-data.") as tmp:
        build_corpus(Path(tmp), CorpusSpec(domains=PIP_DOMAINS, max_chars_per_domain=600_000, fetch=False))
        for target, (domain, split) in zip(targets, DATA_FILES.values()):
            staged = Path(tmp) / target.name
            shutil.copyfile(domain_files(Path(tmp), domain)[split], staged)
            follow_umask(staged)
            staged.replace(target)
    return targets


def run_demo(s: DemoSettings) -> dict:
    from emo_cli.data.documents import data_hash, read_documents
    from emo_cli.evaluation.loss import evaluate_loss
    from emo_cli.experts.pipeline import batches_for, make_plan, masked_loss
    from emo_cli.experts.selection import Budget
    from emo_cli.experts.slim_hf import prune_to_dir
    from emo_cli.experts.usage_profile import DataPart, ModelInfo, ProfileMeta, ProfileSettings, profile_model
    from emo_cli.gguf.export import export_gguf
    from emo_cli.gguf.runtime import load_gguf_model
    from emo_cli.lab.corpus import PIP_DOMAINS, CorpusSpec, build_corpus, domain_files
    from emo_cli.model.generate import EmoEngine, SamplingParams, generate
    from emo_cli.runtime import load_model, open_model

    for d in (TINY_EMO, TINY_STD):
        if not (d / "config.json").exists():
            raise EmoError(f"{d} is missing: the embedded tiny models are not installed")
    _prepare_out(s)
    t0 = time.perf_counter()
    timings = {}
    say = (lambda msg: None) if s.quiet else (lambda msg: ui.err.print(msg, markup=False))

    say("1/5 building demo data from pip-installed sources (ICD-10-CM, SPDX, Python stdlib)")
    data_dir = s.out / "data"
    build_corpus(data_dir, CorpusSpec(domains=PIP_DOMAINS, max_chars_per_domain=600_000, fetch=False))
    med_train, med_held = domain_files(data_dir, "medical")
    train_docs = read_documents([str(med_train)], max_docs=s.profile_docs)
    held = {dom: read_documents([str(domain_files(data_dir, dom)[1])],
                                max_docs=s.eval_docs if dom == "medical" else s.guard_docs) for dom in PIP_DOMAINS}
    timings["data_s"] = time.perf_counter() - t0

    say("2/5 profiling the tiny EMO on medical documents")
    emo = load_model(TINY_EMO)
    std = load_model(TINY_STD)
    data = DataPart(sources=[str(med_train)], text_field=None, max_docs=s.profile_docs, docs=len(train_docs),
                    tokens=0, hash=data_hash(train_docs), heldout_ids=[])

    def meta(lm) -> ProfileMeta:
        return ProfileMeta(model=ModelInfo.of(lm.model, lm.path, lm.fingerprint, spec=str(lm.path)), data=data,
                           settings=ProfileSettings(seq_len=s.seq_len, batch_size=8, max_tokens=None))

    batches = batches_for(emo.tokenizer, train_docs, s.seq_len, 8)
    with ui.progress(disable=s.quiet) as prog:
        step = ui.layer_steps(prog, "profiling tiny EMO", emo.model.num_layers, len(train_docs))
        prof_emo = profile_model(emo.model, batches, meta(emo), on_step=step)
        step = ui.layer_steps(prog, "profiling tiny std MoE", std.model.num_layers, len(train_docs))
        prof_std = profile_model(std.model, batches_for(std.tokenizer, train_docs, s.seq_len, 8), meta(std), on_step=step)
    prof_emo.save(s.out / "medical.profile.safetensors", force=True)
    timings["profile_s"] = time.perf_counter() - t0 - sum(timings.values())

    say(f"3/5 pruning to {s.budget} ({s.method}) and exporting a Q8_0 GGUF")
    budget = Budget.parse(s.budget)
    plan = make_plan([prof_emo], s.method, budget, "uniform", model=emo.model, tokenizer=emo.tokenizer, quiet=True)
    plan_std = make_plan([prof_std], s.method, budget, "uniform", model=std.model, tokenizer=std.tokenizer, quiet=True)
    plan_rand = make_plan([prof_emo], "random", budget, "uniform", seed=0, quiet=True, model=emo.model)
    slim_dir = prune_to_dir(emo.files, plan, s.out / "slim-medical", force=True, source_name="emo:tiny-emo")
    plan.save(slim_dir / "plan.json")
    slim_files = open_model(slim_dir)  # opened once: exported, then evaluated
    gguf_path = s.out / "slim-medical.q8_0.gguf"
    export_gguf(slim_files, gguf_path, quant="q8_0", force=True)
    timings["prune_export_s"] = time.perf_counter() - t0 - sum(timings.values())

    say("4/5 evaluating held-out loss")
    med = held["medical"]
    slim = load_model(slim_files)
    rows = []

    def add(name, model_lm, docs, kept=None):
        if kept is None:
            r = evaluate_loss(model_lm.model, model_lm.tokenizer, docs, seq_len=s.seq_len)
            loss = r.loss
        else:
            loss = masked_loss(model_lm.model, model_lm.tokenizer, docs, kept, s.seq_len)
        rows.append({"model": name, "loss": loss})
        return loss

    full = add("tiny EMO, all experts", emo, med)
    add(f"tiny EMO, {s.budget} medical experts (slim-medical)", slim, med)
    add(f"tiny EMO, random {s.budget}", emo, med, plan_rand.kept)
    std_full = add("tiny standard MoE, all experts", std, med)
    add(f"tiny standard MoE, {s.budget} medical experts", std, med, plan_std.kept)
    for r in rows:
        base = std_full if "standard" in r["model"] else full
        r["increase_pct"] = 100 * (r["loss"] / base - 1)
    guards = {dom: {"full": evaluate_loss(emo.model, emo.tokenizer, docs, seq_len=s.seq_len).loss,
                    "slim": evaluate_loss(slim.model, slim.tokenizer, docs, seq_len=s.seq_len).loss}
              for dom, docs in held.items() if dom != "medical"}
    timings["eval_s"] = time.perf_counter() - t0 - sum(timings.values())

    say("5/5 one-shot completion from the slim GGUF (emo's CPU kernels, greedy)")
    g = load_gguf_model(gguf_path, device="cpu", backend="auto")
    engine = EmoEngine(g.model, g.tokenizer)
    ids = list(generate(engine, g.tokenizer.encode(PROMPT),
                        SamplingParams(temperature=0.0, max_new_tokens=s.new_tokens, seed=0),
                        {g.tokenizer.eos_id} if g.tokenizer.eos_id is not None else set()))
    completion = g.tokenizer.decode(ids)
    timings["generate_s"] = time.perf_counter() - t0 - sum(timings.values())
    kept = len(next(iter(plan.kept.values())))
    total = len(prof_emo.layer_ids(prof_emo.moe_layers()[0]))
    result = {"out": str(s.out), "budget": s.budget, "method": s.method, "experts_kept": kept, "experts_total": total,
              "heldout_docs": len(med), "losses": rows, "guards": guards,
              "slim_dir": str(slim_dir), "gguf": str(gguf_path), "gguf_bytes": gguf_path.stat().st_size,
              "prompt": PROMPT, "completion": completion, "seconds": round(time.perf_counter() - t0, 1),
              "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    (s.out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def render(result: dict) -> None:
    rows = [[r["model"], r["loss"], f"{r['increase_pct']:+.2f}%"] for r in result["losses"]]
    ui.out.print(ui.table(f"held-out medical loss ({result['heldout_docs']} docs; keep {result['experts_kept']} of "
                          f"{result['experts_total']} experts per layer, {result['method']})",
                          ["model", "loss (nats/token)", "vs its full model"], rows))
    grows = [[dom, g["full"], g["slim"], f"{100 * (g['slim'] / g['full'] - 1):+.2f}%"] for dom, g in result["guards"].items()]
    ui.out.print(ui.table("other domains (what the medical slim model gives up)", ["domain", "full", "slim", "change"], grows))
    ui.out.print(f"slim model: {result['slim_dir']}   GGUF (Q8_0): {result['gguf']} ({result['gguf_bytes'] / 1e6:.2f} MB)")
    ui.out.print("completion from the slim GGUF:", style="bold")
    ui.out.print(result["prompt"], end="", markup=False, highlight=False)
    ui.out.print(result["completion"], style="green", markup=False, highlight=False)
    ui.out.print(f"done in {result['seconds']} s; try: emo chat --model {result['gguf']}")
