"""`emo finetune`: recover a slim model by finetuning it on its domain (EMO's recipe)."""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from emo_cli import ui


def finetune_cmd(
    model: str = typer.Argument(..., help="HF model directory (e.g. the slim model emo prune wrote), or an "
                                "embedded model name."),
    data: List[str] = typer.Option(..., "--data", "-d", help="Training data (.jsonl/.json/.parquet/.csv/.txt or a "
                                   "directory; repeatable). Chat rows (messages) train on the assistant turns, "
                                   "multiple-choice rows on the answer, plain text on every token."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output directory (default: <model>-ft)."),
    epochs: float = typer.Option(1.0, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size", help="Examples per optimizer step."),
    micro_batch: int = typer.Option(4, "--micro-batch", help="Examples per forward pass (gradient accumulation "
                                    "up to --batch-size; lower it to save memory)."),
    lr: float = typer.Option(5e-5, "--lr", help="Peak learning rate (linear schedule)."),
    warmup_ratio: float = typer.Option(0.1, "--warmup-ratio"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Gradient-norm clip (0: off)."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Longest window (capped by the model's context)."),
    freeze: str = typer.Option("none", "--freeze", help="What stays fixed: none | router | attention | "
                               "non-expert (train the experts only) | experts."),
    heldout_frac: float = typer.Option(0.1, "--heldout-frac", help="Share of the data scored before and after, "
                                       "never trained on."),
    eval_data: List[str] = typer.Option([], "--eval", help="Other data to score before and after (e.g. another "
                                        "domain, to see what finetuning did to it); repeatable."),
    shots: int = typer.Option(0, "--shots", help="Few-shot prompts for multiple-choice rows (as profiled)."),
    text_field: Optional[str] = typer.Option(None, "--text-field"),
    max_docs: Optional[int] = typer.Option(None, "--max-docs"),
    seed: int = typer.Option(0, "--seed", help="Data order."),
    precision: str = typer.Option("auto", "--precision", help="fp32 | bf16 | auto (bf16 on a GPU, fp32 on CPU)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Optimizer steps between resumable "
                                         "checkpoints."),
    no_checkpoint_0: bool = typer.Option(False, "--no-checkpoint-0", help="Do not keep the input model as "
                                         "checkpoint-0/ (saves its size on disk)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run exactly."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier finetune output or unfinished run."),
    json_out: bool = typer.Option(False, "--json"),
):
    """Finetune a model on its domain with EMO's recipe and write an HF directory beside it:
    1 epoch, global batch 32, lr 5e-5 (linear, 10% warmup), clip 1.0, loss on output tokens only,
    full-parameter unless --freeze. A held-out split is scored on checkpoint 0 (the input,
    unchanged, kept as checkpoint-0/) and after training; finetune.json and FINETUNE.md record it,
    and pruning_metadata.json is kept. Interrupted runs continue bit-exactly with --resume.

    Memory for the released model pruned to 25% (3.9B parameters), bf16 on a GPU, one 2048-token sequence per micro-batch: --freeze none 64.7 GiB, router 64.7, attention 61.2, non-expert 55.8, experts 22.7 (19.4 at --seq-len 1024). Full finetuning is an 80 GB GPU job (the AdamW moments alone are 8 bytes per parameter); on one 24 GB GPU use --freeze experts --micro-batch 1 --seq-len 1024.

    Examples:  emo finetune slim-med --data data/med.jsonl -o slim-med-ft
               emo finetune slim-med --data data/med.jsonl --eval data/code.jsonl --device cuda --freeze experts
    """
    import torch

    from emo_cli.errors import EmoError
    from emo_cli.model.loading import resolve_model_path
    from emo_cli.training.finetune import FinetuneSettings, finetune

    if threads is not None:
        if threads < 1:
            raise EmoError("--threads must be at least 1")
        torch.set_num_threads(threads)
    settings = FinetuneSettings(epochs=epochs, batch_size=batch_size, micro_batch=micro_batch, lr=lr,
                                warmup_ratio=warmup_ratio, weight_decay=weight_decay, grad_clip=grad_clip,
                                seq_len=seq_len, freeze=freeze, heldout_frac=heldout_frac, precision=precision,
                                shots=shots, seed=seed, checkpoint_every=checkpoint_every)
    settings.validate()
    if max_docs is not None and max_docs < 1:
        raise EmoError("--max-docs must be at least 1")
    src = resolve_model_path(model)
    out = output or Path(f"{src.name}-ft")
    with contextlib.ExitStack() as stack:
        bar: dict = {}  # the progress bar opens with the first step, after every input check passed

        def on_step(step, total, tokens, loss):
            if not bar:
                bar["prog"] = stack.enter_context(ui.progress(disable=json_out))
                bar["task"] = bar["prog"].add_task(f"finetuning {src.name}", total=total, tokens=0)
            bar["prog"].update(bar["task"], completed=step, total=total, tokens=tokens,
                               description=f"finetuning {src.name} · loss {loss:.3f}")

        def log(msg):
            if not json_out:
                ui.err.print(msg, markup=False, highlight=False)

        record = finetune(src, list(data), out, settings, device=device, resume=resume, force=force,
                          eval_data=list(eval_data), text_field=text_field, max_docs=max_docs,
                          save_checkpoint_0=not no_checkpoint_0, progress=on_step, log=log,
                          command=shlex.join(["emo", *sys.argv[1:]]))
    if json_out:
        ui.print_json({"output": str(out), **{k: v for k, v in record.items() if k != "history"}})
        return
    rows = [[name, v["before"]["loss"], v["after"]["loss"], v["after"]["loss"] - v["before"]["loss"],
             v["after"]["tokens"]] for name, v in record["loss"].items()]
    ui.out.print(ui.table(f"emo finetune → {out}  ({record['steps']} steps, {record['train_seconds']:.0f} s, "
                          f"{record['trained_parameters']:,} parameters trained)",
                          ["held-out set", "loss before", "loss after", "change", "target tokens"], rows))
