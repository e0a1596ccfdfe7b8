"""`emo profile DATA...` and `emo profile merge A B -o C`."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import List, Optional

import typer

from emo_cli import ui
from emo_cli.cli.commands import options


def profile(
    data: List[str] = typer.Argument(..., help="Domain data: .jsonl/.json/.parquet/.csv/.txt files or dirs "
                                            "(a .txt file is one document per blank-line-separated block). "
                                            "`emo profile merge A B -o C` adds profiles up."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (default: $EMO_MODEL, the workspace, "
                                        "or allenai/Emo_1b14b_1T from the local HF cache)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Default: <data stem>.profile.safetensors"),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Default: text, content or messages."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop adding documents after N tokens."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Truncate each document to N tokens."),
    batch_size: int = typer.Option(8, "--batch-size"),
    heldout_frac: float = typer.Option(0.1, "--heldout-frac", help="Share of documents held out (not profiled) "
                                       "for loss-guided selection and reports; 0 profiles everything."),
    shots: int = typer.Option(0, "--shots", help="Multiple-choice rows (question, choices, answer): precede each "
                              "with N solved items of the same file (seeded, never itself); the prompt plus the gold "
                              "answer is profiled, as EMO's selection does (5 for MMLU)."),
    checkpoint_every: int = typer.Option(1024, "--checkpoint-every", help="Save the partial sums every N documents "
                                         "into <output>.partial/ (a model in memory; a streamed one checkpoints "
                                         "every layer), so the same command resumes an interrupted run."),
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    streaming: str = options.STREAMING,
    max_memory: Optional[float] = options.MAX_MEMORY,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    json_out: bool = typer.Option(False, "--json"),
):
    """Which experts does my domain use? Per layer and ORIGINAL expert id: selection counts, routing
    probability mass, REAP and EASY-EP saliency. Each document is tokenized alone; pads never count.

    A model that does not fit in memory is streamed one layer at a time; such a run checkpoints
    after every layer into <output>.partial/ (a model in memory: every --checkpoint-every
    documents), and the same command run again resumes there.

    Data parallel: torchrun --nproc-per-node N -m emo_cli profile DATA (one node; add --nnodes and
    --rdzv-endpoint for several); rank 0 writes the profile, equal to one process's.

    Examples:  emo profile data/med.jsonl          emo profile merge med.profile.safetensors code.profile.safetensors -o mix.profile.safetensors
    """
    from emo_cli.errors import EmoError
    from emo_cli.experts.pipeline import data_stem, run_profile
    from emo_cli.experts.usage_profile import Profile, coverage
    from emo_cli.model.distributed import world
    from emo_cli.model.memory import Workload
    from emo_cli.outputs import check_location
    from emo_cli.runtime import load_model
    from emo_cli.workspace import absolute_if_local, read_state, resolve_default_model, update_state

    if data and data[0] == "merge" and not Path("merge").exists():
        if len(data) < 3 or output is None:
            raise EmoError("usage: emo profile merge A B [C...] -o OUT")
        check_location(output)
        merged = Profile.load(Path(data[1]))
        for p in data[2:]:
            merged = merged.merged(Profile.load(Path(p)))
        merged.save(output, force=force)
        update_state(profile=str(output.resolve()), stem=output.name.split(".")[0])
        if json_out:
            ui.print_json({"profile": str(output), "docs": merged.docs, "tokens": merged.meta.data.tokens})
        else:
            ui.out.print(f"merged {len(data) - 1} profiles into {output} ({merged.docs} docs)")
        return
    for flag, value, least in (("--shots", shots, 0), ("--checkpoint-every", checkpoint_every, 1), ("--max-docs", max_docs, 1), ("--max-tokens", max_tokens, 1), ("--seq-len", seq_len, 2),
                               ("--batch-size", batch_size, 1)):
        if value is not None and value < least:
            raise EmoError(f"{flag} must be at least {least} (got {value})")
    if not 0 <= heldout_frac < 1:
        raise EmoError(f"--heldout-frac must be in [0, 1) (got {heldout_frac})")
    read_state()  # a corrupt workspace fails now, not after the profile is written
    out = output or Path(f"{data_stem(data[0])}.profile.safetensors")
    check_location(out)
    if out.exists() and not force:
        raise EmoError(f"{out} exists (pass --force to overwrite, or -o another name)")
    spec = resolve_default_model(model)
    lm = load_model(spec, device=world().device(device), dtype=dtype, streaming=streaming, max_memory=max_memory,
                    workload=Workload(batch_size, seq_len, passes=1), what="profiling")
    partial = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    prof = run_profile(lm, data, text_field=text_field, max_docs=max_docs, max_tokens=max_tokens, seq_len=seq_len, shots=shots,
                       batch_size=batch_size, heldout_frac=heldout_frac, quiet=json_out,
                       resume_dir=partial, checkpoint_docs=None if lm.memory and lm.memory.streaming else checkpoint_every)
    pass_s = time.perf_counter() - t0  # rank 0 waits for every rank in the reduction: the slowest
    if not world().writer:  # data parallel: rank 0 writes the profile and the workspace
        return
    prof.meta.model.spec = absolute_if_local(spec)
    prof.save(out, force=force)
    shutil.rmtree(partial, ignore_errors=True)  # data parallel: every rank emptied its own checkpoint
    update_state(model=absolute_if_local(spec), profile=str(out.resolve()), stem=data_stem(data[0]))
    rows = []
    for layer in prof.moe_layers():
        routed = prof.routed_ids(layer)
        top = sorted(routed, key=lambda e: float(prof.prob[layer, e]), reverse=True)[:5]
        rows.append([layer, len(routed), coverage(prof, layer, 0.5), coverage(prof, layer, 0.9),
                     " ".join(str(e) for e in top)])
    summary = {"profile": str(out), "model": spec, "docs": prof.docs, "tokens": prof.meta.data.tokens,
               "memory": lm.memory.as_dict() if lm.memory else None, "pass_s": round(pass_s, 3),
               "ranks": world().size,
               "heldout_docs": sum(len(part.heldout_ids or []) for part in prof.parts()),
               "layers": [{"layer": r[0], "routed": r[1], "cover50": r[2], "cover90": r[3],
                           "top": [int(x) for x in r[4].split()]} for r in rows]}
    if json_out:
        ui.print_json(summary)
        return
    ui.out.print(ui.table(f"{out}: {prof.docs} docs, {summary['tokens']:,} tokens profiled, "
                          f"{summary['heldout_docs']} held out",
                          ["layer", "routed experts", "cover 50% mass", "cover 90% mass", "top experts (by mass)"],
                          rows))
