"""`emo prune`: profile(s) -> plan -> slim HF dir (+ GGUF) -> report of what was lost.

The report evaluates the full model with routing masked to the plan, which gives exactly the slim
model's numbers (docs/design.md#the-masking-identity) without loading a second model. A .gguf model is pruned
into a slim GGUF alone, its experts' bytes copied as they are (experts/slim_gguf.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from emo_cli import ui
from emo_cli.data.documents import read_documents
from emo_cli.errors import EmoError
from emo_cli.experts import slim_gguf
from emo_cli.experts.methods import DEFAULT_METHOD, Method, check_allocation, method_named
from emo_cli.experts.model_card import write_model_card
from emo_cli.experts.pipeline import heldout_documents, make_plan, masked_loss, masked_losses
from emo_cli.experts.selection import Budget, Plan, domain_coverage, layer_budgets
from emo_cli.experts.slim_hf import expected_size, prune_to_dir
from emo_cli.experts.usage_profile import Profile
from emo_cli.gguf.export import check_quant
from emo_cli.model.distributed import world
from emo_cli.model.loading import is_gguf, resolve_model_path
from emo_cli.outputs import check_outputs, remove_stale
from emo_cli.workspace import read_state, resolve_default_model, update_state


@dataclass
class PruneRequest:
    budget: str | None = None  # None: 25%, or what --max-loss-increase finds
    profiles: list[Path] = field(default_factory=list)
    model: str | None = None
    method: Method = method_named(DEFAULT_METHOD)
    heldout: list[str] = field(default_factory=list)
    allocation: str = "uniform"
    output: Path | None = None
    gguf: Path | None = None
    no_gguf: bool = False
    quant: str | None = None  # a name in gguf.quants.QUANTS; None: f16, or a .gguf source's own types
    plan: Path | None = None
    dry_run: bool = False
    seed: int = 0
    max_evals: int = 256
    guard: list[str] = field(default_factory=list)
    max_loss_increase: float | None = None
    force: bool = False
    device: str = "cpu"
    dtype: str = "auto"
    streaming: str = "auto"
    max_memory: float | None = None
    quiet: bool = False
    command: str | None = None  # the command line, for the model card


def parse_percent(text: str) -> float:
    s = str(text).strip().rstrip("%")
    try:
        v = float(s)
    except ValueError:
        raise EmoError(f"--max-loss-increase {text!r} is not a percentage like 2%") from None
    if v < 0:
        raise EmoError("--max-loss-increase must be >= 0%")
    return v


def _load_profiles(req: PruneRequest, state: dict) -> tuple[list[Profile], str]:
    paths = list(req.profiles)
    if not paths:
        if not state.get("profile"):
            raise EmoError("no profile: run `emo profile DATA` first, or pass --profile FILE")
        paths = [Path(state["profile"])]
    profiles = [Profile.load(p) for p in paths]
    for p, path in zip(profiles[1:], paths[1:]):
        if p.fingerprint != profiles[0].fingerprint:
            raise EmoError(f"{path} profiles another model than {paths[0]}; profiles only combine for one model")
    if req.profiles:
        stem = "+".join(Path(p).name.split(".")[0] for p in paths)
    else:
        stem = state.get("stem") or Path(paths[0]).name.split(".")[0]
    return profiles, stem


def run_prune(req: PruneRequest) -> dict:
    from emo_cli.model.memory import Workload
    from emo_cli.runtime import load_model, open_model

    state = read_state()
    profiles, stem = _load_profiles(req, state)
    if req.budget is not None and req.max_loss_increase is not None:
        raise EmoError("--budget and --max-loss-increase both choose the budget: pass one of them")
    budget = Budget.parse(req.budget or "25%")
    if req.plan is None and req.max_loss_increase is None:  # a bad budget fails before any loading
        layer_budgets(profiles[0], budget, profiles[0].meta.model.top_k or 1)
    check_allocation(req.allocation)
    spec = req.model or os.environ.get("EMO_MODEL") or profiles[0].meta.model.spec or state.get("model")
    spec = resolve_default_model(spec)
    path = resolve_model_path(spec)
    opened = open_model(path)  # the command's one handle on the model: everything below takes it
    source = files = None
    if is_gguf(path):
        source = slim_gguf.open_source(opened)
        fingerprints, described = source.fingerprints, source.describe()
        out, gguf_path = None, slim_gguf.output_path(req.output, req.gguf, req.no_gguf, stem)
        slim_gguf.check_quant(source, req.quant)
    else:
        files = opened
        fingerprints, described = (files.fingerprint,), f"{spec} ({files.fingerprint})"
        out = Path(req.output or f"slim-{stem}")
        gguf_path = None if req.no_gguf else Path(req.gguf or f"{out}.gguf")
    if profiles[0].fingerprint not in fingerprints:
        raise EmoError(f"the profile was made on another model ({profiles[0].meta.model.path}, "
                       f"fingerprint {profiles[0].fingerprint}) than {described}")
    if not req.dry_run:
        if source is not None and gguf_path.resolve() == path.resolve():
            raise EmoError(f"{gguf_path} is the model being pruned; write the slim file under another name")
        check_outputs(out, gguf_path, req.force)
        if gguf_path is not None and source is None:
            check_quant(req.quant or "f16")
    heldout = (read_documents(req.heldout) if req.heldout else heldout_documents(profiles))
    if req.method.needs_heldout and req.plan is None and not heldout:  # before any model is loaded
        raise EmoError(f"{req.method.name} needs held-out documents: profile with --heldout-frac > 0 "
                       "or pass --heldout DATA")
    if req.max_loss_increase is not None and req.plan is None and not heldout:
        raise EmoError("--max-loss-increase needs held-out documents (profile with --heldout-frac > 0 or pass --heldout)")
    guards = [(g, read_documents([g])) for g in req.guard]
    needs_model = req.method.kind == "data" or heldout or guards or req.max_loss_increase is not None
    lm = None
    if needs_model:
        settings = profiles[0].meta.settings
        lm = load_model(opened, device=world().device(req.device), dtype=req.dtype, streaming=req.streaming,
                        max_memory=req.max_memory, workload=Workload(settings.batch_size, settings.seq_len,
                                                                      passes=_weight_passes(req)),
                        what="pruning with held-out reports")
    model, tok = (lm.model, lm.tokenizer) if lm else (None, None)
    seq_len = profiles[0].meta.settings.seq_len
    chosen_by = None

    def plan_for(b: Budget) -> Plan:
        return make_plan(profiles, req.method.name, b, req.allocation, model=model, tokenizer=tok,
                         heldout_docs=heldout, seed=req.seed, max_evals=req.max_evals, quiet=req.quiet)

    if req.plan is not None:
        plan = Plan.load(req.plan)
        if plan.model_fingerprint not in fingerprints:
            raise EmoError(f"{req.plan} was made for another model (fingerprint {plan.model_fingerprint}) "
                           f"than {described}")
    elif req.max_loss_increase is not None:
        if not heldout:
            raise EmoError("--max-loss-increase needs held-out documents (profile with --heldout-frac > 0 or pass --heldout)")
        plan, chosen_by = _search_budget(req, profiles, model, tok, heldout, seq_len, plan_for)
    else:
        plan = plan_for(budget)
    # a GGUF takes only plans it can hold (one expert count): refused before any evaluation
    full_bytes, slim_bytes = slim_gguf.expected_size(source, plan) if source else expected_size(files, plan)
    report = {"model": spec, "output": str(out or gguf_path), "method": plan.method, "budget": plan.budget,
              "allocation": plan.allocation, "kept_per_layer": {str(k): len(v) for k, v in plan.kept.items()},
              "bytes_before": full_bytes, "bytes_after": slim_bytes, "bytes_saved": full_bytes - slim_bytes,
              "coverage": {Path(p.meta.data.sources[0]).name: round(domain_coverage(p, plan), 4) for p in profiles}}
    if chosen_by:
        report["budget_search"] = chosen_by
    if lm is not None and lm.memory is not None:
        report["memory"] = lm.memory.as_dict()
    if model is not None and (heldout or guards):
        report["eval"] = _losses(model, tok, plan, heldout, guards, seq_len, req.quiet)
    if plan.extra.get("forward_equivalents") is not None:
        report["greedy"] = {k: plan.extra[k] for k in ("start", "evals", "forward_equivalents", "seed_losses")}
    if req.dry_run:
        report["dry_run"] = True
        report["plan"] = {str(k): v for k, v in plan.kept.items()}
        return report
    if not world().writer:  # data parallel: every rank took the same decisions; rank 0 writes
        return report
    if source is not None:
        lm = model = None
        report["gguf"] = _prune_gguf(source, plan, gguf_path, spec, req)
        update_state(model=state.get("model") or spec, slim=str(gguf_path.resolve()))
        return report
    extra_meta = {"profile_files": [str(p) for p in (req.profiles or [state.get("profile")])]}
    ev = report.get("eval", {}).get("heldout")
    if ev:
        extra_meta["heldout_loss_before"], extra_meta["heldout_loss_after"] = ev["before"], ev["after"]
    lm = model = None  # the model is not needed to write the slim files: free it first
    # everything is written under staging names first; the old outputs are replaced only once all
    # of the new ones are complete, the directory and the GGUF together
    remove_stale(out.parent, out.name)
    if gguf_path is not None:  # this run's staging (stem) and `emo export`'s (name)
        remove_stale(gguf_path.parent, gguf_path.stem)
        remove_stale(gguf_path.parent, gguf_path.name)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
    staged_gguf = gguf_path.with_name(f".{gguf_path.stem}.{os.getpid()}.new.gguf") if gguf_path else None
    try:
        slim = stage / out.name  # the final name: the GGUF takes its model name from it
        with ui.progress(disable=req.quiet) as prog:
            task = prog.add_task(f"writing {out} · layers", total=files.config.num_hidden_layers, bytes=0)
            prune_to_dir(files, plan, slim, extra_meta=extra_meta, source_name=spec,
                         on_layer=lambda _i, nbytes: prog.update(task, advance=1, bytes=nbytes))
        plan.save(slim / "plan.json")
        write_model_card(slim, report, path, req.command)  # the GGUF export reads base model and license here
        report["gguf"] = _export(slim, staged_gguf, gguf_path.name, req) if gguf_path else None
        wrote_gguf = bool(report["gguf"] and report["gguf"].get("path"))
        if wrote_gguf:
            report["gguf"]["path"] = str(gguf_path)
            write_model_card(slim, report, path, req.command)  # now with the GGUF it has
        (slim / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        publish(slim, out, stage, staged_gguf if wrote_gguf else None, gguf_path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if staged_gguf is not None:
            staged_gguf.unlink(missing_ok=True)
    update_state(model=state.get("model") or spec, slim=str(out.resolve()), plan=str((out / "plan.json").resolve()))
    return report


def publish(slim: Path, out: Path, stage: Path, staged_gguf: Path | None, gguf_path: Path | None) -> None:
    """Move the complete new outputs into place; an old GGUF that the new model has none for is
    removed with the old directory it belonged to."""
    if out.exists():
        os.replace(out, stage / ".replaced")
    try:
        os.replace(slim, out)
    except OSError:
        if (stage / ".replaced").exists():
            os.replace(stage / ".replaced", out)
        raise
    if gguf_path is not None:
        if staged_gguf is not None:
            os.replace(staged_gguf, gguf_path)
        elif gguf_path.exists():
            gguf_path.unlink()


def _weight_passes(req: PruneRequest) -> int:
    """How often the chosen work reads the weights: the memory planner keeps the whole model in
    memory for repeated passes when it fits, and streams single passes."""
    if req.max_loss_increase is not None:
        return 8  # a binary search over the budget, one held-out pass each
    return req.method.weight_passes


def _losses(model, tok, plan, heldout, guards, seq_len, quiet) -> dict:
    """Loss before/after on each set; on multiple-choice items also accuracy before/after, as the
    items were profiled (same in-context examples)."""
    from emo_cli.evaluation.multiple_choice import evaluate_mc

    res = {}
    sets = ([("heldout", heldout)] if heldout else []) + guards
    for name, docs in sets:
        before, after = masked_losses(model, tok, docs, [None, plan.kept], seq_len, quiet=quiet)
        res[name] = {"docs": len(docs), "before": before, "after": after,
                     "increase_pct": 100 * (after / before - 1) if before else None}
        items = [d.item for d in docs if d.item is not None]
        if items:
            full, slim = (evaluate_mc(model, tok, items, seq_len, kept=k) for k in (None, plan.kept))
            res[name].update(acc_before=full["acc"], acc_after=slim["acc"], acc_norm_before=full["acc_norm"],
                             acc_norm_after=slim["acc_norm"], items=len(items))
    return res


def _search_budget(req, profiles, model, tok, heldout, seq_len, plan_for):
    """Smallest uniform kept count whose held-out loss rises by at most X% (binary search; loss
    is taken as non-increasing in the budget, which selection by score makes nearly true)."""
    limit = parse_percent(req.max_loss_increase)
    base = masked_loss(model, tok, heldout, None, seq_len, quiet=req.quiet)
    sizes = [len(profiles[0].layer_ids(l)) for l in profiles[0].moe_layers()]
    lo = min(model.config.num_experts_per_tok, min(sizes))
    hi = min(sizes)
    tried = {}
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        plan = plan_for(Budget.parse(str(mid)))
        loss = masked_loss(model, tok, heldout, plan.kept, seq_len, quiet=req.quiet)
        tried[mid] = round(100 * (loss / base - 1), 4)
        if loss <= base * (1 + limit / 100):
            best, hi = (mid, plan), mid - 1
        else:
            lo = mid + 1
    if best is None:
        raise EmoError(f"no budget keeps the held-out loss within +{limit}% (tried {tried})")
    return best[1], {"max_increase_pct": limit, "chosen_keep": best[0], "tried": tried, "base_loss": base}


def _export(out: Path, gguf_path: Path, label: str, req: PruneRequest):
    from emo_cli.gguf.export import export_gguf, gguf_blocker
    from emo_cli.model.loading import open_hf_dir

    slim = open_hf_dir(out)
    reason = gguf_blocker(slim.config, out)
    if reason:
        ui.err.print(f"note: no GGUF written: {reason}", markup=False)
        return {"skipped": reason}
    with ui.progress(disable=req.quiet) as prog:
        task = prog.add_task(f"exporting {label} · tensors", total=None, bytes=0)
        export_gguf(slim, gguf_path, quant=req.quant or "f16", force=True,
                    progress=lambda stage, done, total, nbytes: prog.update(
                        task, completed=done, total=total, bytes=nbytes, description=f"{stage} {label} · tensors"))
    return {"path": str(gguf_path), "quant": req.quant or "f16", "bytes": gguf_path.stat().st_size}


def _prune_gguf(source, plan: Plan, gguf_path: Path, spec: str, req: PruneRequest) -> dict:
    with ui.progress(disable=req.quiet) as prog:
        task = prog.add_task(f"writing {gguf_path} · tensors", total=None, bytes=0)
        res = slim_gguf.prune_gguf(source, plan, gguf_path, force=req.force, source_name=spec,
                                    progress=lambda done, total, nbytes: prog.update(
                                        task, completed=done, total=total, bytes=nbytes))
    return {k: res[k] for k in ("path", "quant", "bytes")}
