"""Does finetuning recover a slim model? EMO's recipe on the embedded tiny models (docs/results.md).

    python bench/finetune.py                      # writes the `finetune` block of docs/results.md

For the tiny EMO and the tiny standard MoE, at keep 25% and 12.5%: profile the medical selection
data, prune (`emo prune --method frequency`), finetune the slim model on the same selection data
(`emo finetune`), and score held-out documents of every domain that neither selection nor
finetuning (nor pretraining) saw. Every number is the same loss: mean nats per token over all
windows of the documents (`emo_cli.training.finetune.heldout_loss`), for the full model, the slim model
(checkpoint 0) and the slim model after finetuning. Each step runs the CLI, so the commands in the
output re-measure any cell.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its scripts (bench/profile.py) would shadow stdlib modules

from bench.results_md import replace_block, shown, tiny_pair_parser  # noqa: E402

from emo_cli import ui  # noqa: E402
from emo_cli.lab.corpus import build_corpus, domain_files, read_texts  # noqa: E402
from emo_cli.data.documents import Document  # noqa: E402
from emo_cli.training.finetune import heldout_loss, make_examples  # noqa: E402
from emo_cli.model.loading import load_hf_model  # noqa: E402
from emo_cli.lab.pretrain_recipe import load_recipe  # noqa: E402
from emo_cli.model.tokenizer import EmoTokenizer  # noqa: E402

KEEPS = ("25%", "12.5%")


def emo(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "emo_cli", *args, "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"emo {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def full_losses(model_dir: Path, sets: dict[str, Path], seq_len: int) -> dict[str, float]:
    model, _ = load_hf_model(model_dir, dtype=torch.float32)
    cfg = model.config
    tok = EmoTokenizer.from_dir(model_dir, cfg.eos_token_id, cfg.pad_token_id)
    out = {}
    for name, path in sets.items():
        docs = [Document(t, str(path), i) for i, t in enumerate(read_texts(path))]
        wins = [w for ws in make_examples(tok, docs, seq_len) for w in ws]
        out[name] = heldout_loss(model, wins, tok.pad_id, 8, "cpu", "fp32")["loss"]
    return out


def _summary(rec: dict, sets: dict[str, Path]) -> tuple[dict, dict, dict]:
    """(slim losses, finetuned losses, run facts) of one finetune record, per domain."""
    by_path = {str(p): name for name, p in sets.items()}
    slim = {by_path[k]: v["before"]["loss"] for k, v in rec["loss"].items() if k in by_path}
    tuned = {by_path[k]: v["after"]["loss"] for k, v in rec["loss"].items() if k in by_path}
    facts = {k: rec[k] for k in ("steps", "tokens", "train_seconds", "trained_parameters")}
    facts["selection_heldout"] = rec["loss"]["heldout"]
    return slim, tuned, facts


def measure(key: str, model_dir: Path, sel: Path, sets: dict[str, Path], work: Path, args, log) -> dict:
    res = {"full": full_losses(model_dir, sets, args.seq_len), "slim": {}, "tuned": {}, "finetune": {}}
    prof = work / f"{key}.profile.safetensors"
    reuse = lambda p: args.reuse and p.exists()  # noqa: E731
    if not reuse(prof):
        emo("profile", str(sel), "--model", str(model_dir), "--seq-len", str(args.seq_len), "-o", str(prof), "--force")
    for keep in args.keeps:
        slim, tuned = work / f"{key}-{keep.rstrip('%')}", work / f"{key}-{keep.rstrip('%')}-ft"
        if reuse(tuned / "finetune.json"):  # a finished finetune of an earlier, interrupted run of this script
            rec = json.loads((tuned / "finetune.json").read_text())
            res["slim"][keep], res["tuned"][keep], res["finetune"][keep] = _summary(rec, sets)
            continue
        emo("prune", "--profile", str(prof), "--model", str(model_dir), "--budget", keep, "--method", "frequency",
            "-o", str(slim), "--no-gguf", "--force")
        ft_args = ["finetune", str(slim), "--data", str(sel), "-o", str(tuned), "--force", "--lr", str(args.lr),
                   "--epochs", str(args.epochs), "--seq-len", str(args.seq_len), "--no-checkpoint-0", "--device", "cpu"]
        for path in sets.values():
            ft_args += ["--eval", str(path)]
        res["slim"][keep], res["tuned"][keep], res["finetune"][keep] = _summary(emo(*ft_args), sets)
        log(f"{key} keep {keep}: medical full {res['full']['medical']:.3f} slim {res['slim'][keep]['medical']:.3f} "
            f"finetuned {res['tuned'][keep]['medical']:.3f}")
    return res


def pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def render(res: dict, args, seconds: float) -> str:
    domains = res["domains"]
    L = ["# Finetuning the slim models (EMO's recovery step)\n",
         "Generated by `python bench/finetune.py` (do not edit by hand). "
         f"Run took {seconds / 60:.1f} min on {platform.machine()} with {torch.get_num_threads()} threads"
         + (" (with --reuse: profiles and finished finetunes already in the work directory were kept; their "
            "seconds below are from the run that made them, which shared the machine with other jobs).\n"
            if args.reuse else ".\n"),
         f"Selection and finetuning data: {res['sel_docs']} medical training documents (profiled with `emo profile`, "
         f"pruned with `emo prune --method frequency`, finetuned with `emo finetune --epochs {args.epochs} "
         f"--lr {args.lr}`, otherwise EMO's defaults: batch 32, linear schedule with 10% warmup, clip 1.0). "
         "The tiny models were pretrained at lr 3e-3, so EMO's 5e-5 (chosen for the 14B model) barely moves them. "
         "Loss: mean nats per token over every window of each domain's held-out documents, which selection, "
         "finetuning and pretraining never saw ("
         + ", ".join(f"{d} {n}" for d, n in res["heldout_docs"].items()) + " documents).\n",
         "## Medical (the selected domain)\n",
         "| model | keep | full | slim | slim + finetune | gap closed | slim vs full | finetuned vs full |",
         "|---|---|---|---|---|---|---|---|"]
    for key, name in (("emo", "tiny EMO"), ("std", "tiny standard MoE")):
        r = res[key]
        for keep in res["keeps"]:
            f, s, t = r["full"]["medical"], r["slim"][keep]["medical"], r["tuned"][keep]["medical"]
            closed = (s - t) / (s - f) if s > f else float("nan")
            L.append(f"| {name} | {keep} | {f:.3f} | {s:.3f} | {t:.3f} | {closed:.0%} | {pct(s / f - 1)} | "
                     f"{pct(t / f - 1)} |")
    L += ["", "## The other domains (what finetuning on medical did to them)\n",
          "| model | keep | " + " | ".join(f"{d}: full / slim / finetuned" for d in domains if d != "medical") + " |",
          "|---|---|" + "---|" * (len(domains) - 1)]
    for key, name in (("emo", "tiny EMO"), ("std", "tiny standard MoE")):
        r = res[key]
        for keep in res["keeps"]:
            L.append(f"| {name} | {keep} | " + " | ".join(
                f"{r['full'][d]:.2f} / {r['slim'][keep][d]:.2f} / {r['tuned'][keep][d]:.2f}"
                for d in domains if d != "medical") + " |")
    L += ["", "## Finetuning runs\n", "| model | keep | steps | tokens | seconds | trained parameters |",
          "|---|---|---|---|---|---|"]
    for key, name in (("emo", "tiny EMO"), ("std", "tiny standard MoE")):
        for keep in res["keeps"]:
            f = res[key]["finetune"][keep]
            L.append(f"| {name} | {keep} | {f['steps']} | {f['tokens']:,} | {f['train_seconds']:.0f} | "
                     f"{f['trained_parameters']:,} |")
    L += ["", "Re-measure one row:", "```",
          f"emo profile sel-medical.jsonl --model tiny-emo --seq-len {args.seq_len} -o emo.profile.safetensors",
          "emo prune --profile emo.profile.safetensors --model tiny-emo --budget 25% --method frequency -o slim --no-gguf",
          f"emo finetune slim --data sel-medical.jsonl --lr {args.lr} --epochs {args.epochs} "
          "--eval medical.heldout.jsonl --eval code.heldout.jsonl -o slim-ft   # ... one --eval per domain",
          "```", f"(`sel-medical.jsonl`: the first {res['sel_docs']} documents of `corpus/medical.train.jsonl`.) "
          f"Raw numbers: `{shown(args.json_out)}`.\n"]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = tiny_pair_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-finetune")
    ap.add_argument("--sel-docs", type=int, default=400, help="medical training documents for selection + finetuning")
    ap.add_argument("--other-docs", type=int, default=40, help="held-out documents scored per other domain")
    ap.add_argument("--keeps", default=",".join(KEEPS))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--reuse", action="store_true", help="keep the profiles and finished finetunes already in --work")
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--json-out", type=Path, default=ROOT / "bench" / "finetune.json")
    args = ap.parse_args()
    args.keeps = args.keeps.split(",")
    recipe = load_recipe(args.emo / "recipe.toml")
    spec = recipe.corpus.spec(recipe.train.seed)
    build_corpus(args.corpus, spec, log=lambda m: ui.err.print(m))
    args.work.mkdir(parents=True, exist_ok=True)
    sel_texts = read_texts(domain_files(args.corpus, "medical")[0])[:args.sel_docs]
    sel = write_jsonl(args.work / "sel-medical.jsonl", sel_texts)
    sets = {d: write_jsonl(args.work / f"{d}.heldout.jsonl",
                           read_texts(domain_files(args.corpus, d)[1])[:None if d == "medical" else args.other_docs])
            for d in spec.domains}
    log = lambda m: ui.err.print(m, markup=False)  # noqa: E731
    t0 = time.perf_counter()
    res = {"domains": list(spec.domains), "keeps": args.keeps, "sel_docs": len(sel_texts), "lr": args.lr,
           "heldout_docs": {d: len(read_texts(p)) for d, p in sets.items()},
           "epochs": args.epochs, "seq_len": args.seq_len}
    res["emo"] = measure("emo", args.emo, sel, sets, args.work, args, log)
    res["std"] = measure("std", args.std, sel, sets, args.work, args, log)
    seconds = time.perf_counter() - t0
    res["seconds"] = round(seconds, 1)
    args.json_out.write_text(json.dumps(res, indent=1) + "\n")
    replace_block(args.out, "finetune", render(res, args, seconds))
    ui.out.print(f"wrote {args.out} and {args.json_out}")


if __name__ == "__main__":
    main()
