"""Orchestration of `emo profile` and `emo prune`: files, progress and data around the pure cores
(usage_profile.profile_model, selection.score_plan, search.router_plan/greedy_plan, slim_hf.prune_to_dir)."""

from __future__ import annotations

from pathlib import Path

from emo_cli import ui
from emo_cli.data.documents import Document, data_hash, heldout_split, make_batches, read_documents, tokenize_documents
from emo_cli.errors import EmoError
from emo_cli.experts.methods import method_named
from emo_cli.experts.usage_profile import DataPart, ModelInfo, Profile, ProfileMeta, ProfileSettings, profile_model


def data_stem(path: str | Path) -> str:
    p = Path(path)
    return p.stem if p.is_file() or p.suffix else p.name


def batches_for(tokenizer, docs: list[Document], seq_len: int, batch_size: int, max_tokens=None):
    toks = tokenize_documents(tokenizer, docs, seq_len)
    return make_batches(toks, docs, batch_size, tokenizer.pad_id, max_tokens=max_tokens)


def run_profile(lm, data: list[str], text_field=None, max_docs=None, max_tokens=None, seq_len=2048,
                batch_size=8, heldout_frac=0.1, quiet=False, resume_dir: Path | None = None, shots: int = 0,
                checkpoint_docs: int | None = None) -> Profile:
    """Profile `data`; with `resume_dir` the pass checkpoints (after every layer, or with
    `checkpoint_docs` every that many documents) and an interrupted run of the same command
    continues where it stopped."""
    docs = read_documents(data, text_field=text_field, max_docs=max_docs, shots=shots)
    profiled, held = heldout_split(docs, heldout_frac, salt="emo-profile:")
    batches = batches_for(lm.tokenizer, profiled, seq_len, batch_size, max_tokens)
    meta = ProfileMeta(
        model=ModelInfo.of(lm.model, lm.path, lm.fingerprint),
        data=DataPart(sources=[str(Path(d).resolve()) for d in data], text_field=text_field, max_docs=max_docs,
                      shots=shots, multiple_choice=any(d.item is not None for d in docs),
                      docs=sum(len(b.doc_index) for b in batches),
                      tokens=int(sum(int(b.mask.sum()) for b in batches)), hash=data_hash(docs),
                      total_docs=len(docs), heldout_frac=heldout_frac, heldout_ids=[d.index for d in held]),
        settings=ProfileSettings(max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size),
    )
    with ui.progress(disable=quiet) as prog:
        label = "profiling" + (" · streamed" if lm.memory and lm.memory.streaming else "")
        step = ui.layer_steps(prog, label, lm.model.num_layers, meta.data.docs)

        def resumed(where: str, layers_done: int, batches_done: int):
            prog.console.print(f"resuming an interrupted run at {where} ({resume_dir})", style="dim")
            for layer in range(lm.model.num_layers):  # the bar shows the work already done, without its tokens
                for i, b in enumerate(batches):
                    if layer < layers_done or i < batches_done:
                        step(layer, len(b.doc_index), 0)

        return profile_model(lm.model, batches, meta, on_step=step, resume_dir=resume_dir, on_resume=resumed,
                             checkpoint_docs=checkpoint_docs)


def _locate(source: str, profile_path: Path | None) -> str:
    """A profiled data path as recorded (absolute since emo 0.1; relative to where `emo profile`
    ran before), else a file of the same name next to the profile."""
    if Path(source).exists():
        return source
    near = profile_path.parent / Path(source).name if profile_path is not None else None
    if near is not None and near.exists():
        return str(near)
    where = f" or next to {profile_path}" if profile_path is not None else ""
    raise EmoError(f"{source}: the profiled data is not there{where} (moved? pass --heldout DATA, or profile again)")


def _reread(part: DataPart, profile_path: Path | None) -> list[Document]:
    sources = [_locate(src, profile_path) for src in part.sources]
    docs = read_documents(sources, text_field=part.text_field, max_docs=part.max_docs, shots=part.shots or 0)
    if data_hash(docs) != part.hash:
        raise EmoError(f"{', '.join(sources)} changed since it was profiled (content hash differs); profile it again")
    return docs


def _documents(profiles: list[Profile], held_out: bool) -> list[Document]:
    out = []
    for prof in profiles:
        for part in prof.parts():
            ids = set(part.heldout_ids or [])
            if held_out and not ids:
                continue
            out += [d for d in _reread(part, prof.path) if (d.index in ids) == held_out]
    return out


def profiled_documents(profiles: list[Profile]) -> list[Document]:
    """The documents the profiles were computed on (data re-read, held-out documents excluded)."""
    return _documents(profiles, held_out=False)


def heldout_documents(profiles: list[Profile]) -> list[Document]:
    """The documents the profiles held out (for loss-guided selection and reports)."""
    return _documents(profiles, held_out=True)


def make_plan(profiles, method: str, budget, allocation, model=None, tokenizer=None, heldout_docs=None,
              seed=0, max_evals=256, quiet=False):
    """Plan of `method` (a name in experts/methods.py) for one budget; data-driven methods need the
    loaded model."""
    from emo_cli.experts.search import greedy_plan, router_plan
    from emo_cli.experts.selection import score_plan

    m = method_named(method)
    top_k = profiles[0].meta.model.top_k
    if m.kind == "score":
        plan = score_plan(profiles, m.name, budget, allocation, top_k, seed=seed)
    else:
        s = profiles[0].meta.settings
        calib = batches_for(tokenizer, profiled_documents(profiles), s.seq_len, s.batch_size, s.max_tokens)
        with ui.progress(disable=quiet) as prog:
            if m.name == "router":
                per_layer = sum(int(b.mask.sum()) for b in calib) / model.num_layers  # as whole-model tokens
                task = prog.add_task("router: layerwise", total=model.num_layers, tokens=0)
                plan = router_plan(model, calib, profiles, budget, allocation, top_k,
                                   on_layer=lambda _l: prog.update(
                                       task, advance=1, tokens=prog.tasks[task].fields["tokens"] + per_layer))
            else:  # greedy, the other data-driven method
                held = batches_for(tokenizer, heldout_docs or [], s.seq_len, s.batch_size)
                task = prog.add_task("greedy: held-out loss evaluations", total=None)
                plan = greedy_plan(model, calib, held, profiles, budget, allocation, top_k, max_evals=max_evals,
                                   on_eval=lambda f: prog.update(task, advance=f))
    plan.extra["profile_fingerprint"] = "+".join(p.meta.data.hash for p in profiles)
    return plan


def masked_losses(model, tokenizer, docs, kept_sets: list, seq_len, batch_size=8, quiet=True) -> list[float]:
    """Held-out loss of the model with routing masked to each of `kept_sets` (None = all experts;
    a masked loss equals the slim model's, by the identity), all in one pass over the model."""
    from emo_cli.evaluation.loss import evaluate_losses
    from emo_cli.model.api import masks_for

    with ui.progress(disable=quiet) as prog:
        step = ui.layer_steps(prog, "held-out loss", model.num_layers, len(docs))
        return [r.loss for r in evaluate_losses(model, tokenizer, docs, [masks_for(model, k) for k in kept_sets],
                                                seq_len=seq_len, batch_size=batch_size, on_step=step)]


def masked_loss(model, tokenizer, docs, kept, seq_len, batch_size=8, quiet=True) -> float:
    return masked_losses(model, tokenizer, docs, [kept], seq_len, batch_size, quiet)[0]
