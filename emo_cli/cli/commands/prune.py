"""`emo prune`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from emo_cli import ui
from emo_cli.cli.commands import options
from emo_cli.experts.methods import ALLOCATIONS, DEFAULT_METHOD, METHODS, method_named


def prune(
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="Experts kept per layer INCLUDING shared ones: "
                               "25% (of each layer, never below top-k; the default) or a count like 32."),
    profile: List[Path] = typer.Option([], "--profile", "-p", help="Profile(s); several = one plan serving all "
                                       "domains. Default: the workspace's last profile."),
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    method: options.MethodChoice = typer.Option(DEFAULT_METHOD, "--method", parser=options.parse_method,
                                                help=options.method_labels(METHODS) + " greedy costs ≈ 5 + swaps x "
                                                "(L-l)/L forward passes over the held-out set, bounded by --max-evals."),
    heldout: List[str] = typer.Option([], "--heldout", help="Held-out data for greedy and the report "
                                      "(default: the profile's held-out documents)."),
    allocation: options.AllocationChoice = typer.Option("uniform", "--allocation", parser=options.parse_allocation,
                                                        help="; ".join(f"{k}: {v}" for k, v in ALLOCATIONS.items())
                                                        + "."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Default: slim-<data stem>/"),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="GGUF path (default: <output>.gguf). A .gguf "
                                        "model is pruned into this one file (-o X also names it X.gguf)."),
    no_gguf: bool = typer.Option(False, "--no-gguf", help="Write only the HF directory."),
    quant: Optional[options.QuantChoice] = typer.Option(None, "--quant", parser=options.parse_quant, help="GGUF "
                                                        "type (default f16). A .gguf model keeps its own types "
                                                        "(no re-quantization)."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Re-apply a saved plan.json."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and the expected size; write nothing."),
    seed: int = typer.Option(0, "--seed", help="Seed of --method random."),
    max_evals: int = typer.Option(256, "--max-evals", help="Upper bound on greedy's candidate evaluations."),
    guard: List[str] = typer.Option([], "--guard", help="Other domains to report loss on, before and after."),
    max_loss_increase: Optional[str] = typer.Option(None, "--max-loss-increase", help="Search the smallest budget "
                                                    "whose held-out loss rises by at most X% (e.g. 2%)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    streaming: str = options.STREAMING,
    max_memory: Optional[float] = options.MAX_MEMORY,
    json_out: bool = typer.Option(False, "--json"),
):
    """Keep the experts a domain uses and write a slim HF model (and its GGUF); a .gguf model gives a slim GGUF.

    Examples:  emo prune --budget 25%      emo prune --budget 16 --method greedy --guard data/code.jsonl
               emo prune -p med.profile.safetensors -p code.profile.safetensors --budget 32 -o slim-medcode
               torchrun --nproc-per-node 8 -m emo_cli prune --budget 25% --method greedy --device cuda
               (data parallel: held-out losses split over the ranks; rank 0 writes)
    """
    from emo_cli.experts.prune import PruneRequest, run_prune

    req = PruneRequest(budget=budget, profiles=list(profile), model=model, method=method_named(method.value),
                       heldout=list(heldout), allocation=allocation.value, output=output, gguf=gguf, no_gguf=no_gguf,
                       quant=quant.value if quant else None, plan=plan,
                       dry_run=dry_run, seed=seed, max_evals=max_evals, guard=list(guard),
                       max_loss_increase=max_loss_increase, force=force, device=device, dtype=dtype,
                       streaming=streaming, max_memory=max_memory, quiet=json_out,
                       command=shlex.join(["emo", *sys.argv[1:]]))
    report = run_prune(req)
    if json_out:
        ui.print_json(report)
        return
    render_report(report)


def render_report(r: dict) -> None:
    counts = sorted(set(r["kept_per_layer"].values()))
    kept = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]} (per layer)"
    rows = [["method", r["method"]], ["budget", r["budget"]], ["allocation", r["allocation"]],
            ["experts kept per layer", kept], ["size before", _gb(r["bytes_before"])],
            ["size after", _gb(r["bytes_after"])], ["memory saved", _gb(r["bytes_saved"])]]
    for dom, cov in r["coverage"].items():
        rows.append([f"routing mass kept: {dom}", f"{100 * cov:.1f}%"])
    if r.get("budget_search"):
        bs = r["budget_search"]
        rows.append(["budget search", f"keep {bs['chosen_keep']} (<= +{bs['max_increase_pct']}% held-out loss)"])
    if r.get("greedy"):
        g = r["greedy"]
        rows.append(["greedy", f"start {g['start']}, {g['evals']} evals, {g['forward_equivalents']} forward-equiv."])
    if r.get("gguf"):
        g = r["gguf"]
        rows.append(["gguf", g.get("path") or f"skipped: {g['skipped']}"])
    if not r.get("dry_run"):
        rows.append(["output", r["output"]])
    ui.out.print(ui.table("emo prune" + (" (dry run)" if r.get("dry_run") else ""), ["", "value"], rows))
    if r.get("eval"):
        erows = [[name, e["docs"], e["before"], e["after"], f"{e['increase_pct']:+.2f}%"] for name, e in r["eval"].items()]
        ui.out.print(ui.table("loss before / after (nats/token)", ["data", "docs", "before", "after", "change"], erows))
        arows = [[name, e["items"], f"{e['acc_before']:.3f}", f"{e['acc_after']:.3f}", f"{e['acc_norm_before']:.3f}",
                  f"{e['acc_norm_after']:.3f}"] for name, e in r["eval"].items() if "acc_before" in e]
        if arows:
            ui.out.print(ui.table("multiple-choice accuracy before / after", ["data", "items", "acc before",
                                  "acc after", "acc_norm before", "acc_norm after"], arows))
    if r.get("dry_run"):
        ui.out.print(ui.table("plan: kept original expert ids", ["layer", "kept"],
                              [[k, " ".join(map(str, v))] for k, v in r["plan"].items()]))


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"
