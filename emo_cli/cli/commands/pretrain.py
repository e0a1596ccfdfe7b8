"""`emo pretrain`: train a small EMO (or standard MoE) model from a TOML recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emo_cli import ui


def pretrain_cmd(
    recipe: Path = typer.Option(..., "--recipe", help="TOML recipe (see recipes/tiny-emo.toml)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output model directory (default runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in the output directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing model or unfinished run."),
    device: str = typer.Option("auto", "--device", help="auto (a CUDA GPU when present, else CPU), cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    keep_checkpoint: bool = typer.Option(False, "--keep-checkpoint", help="Keep the resumable checkpoint after the run."),
    json_out: bool = typer.Option(False, "--json", help="Print the training record as one JSON object."),
):
    """Build the recipe's corpus and tokenizer, train, and save a Hugging Face EMO model directory.

    Progress shows steps, tokens/s, ETA and the training loss; a checkpoint is written every
    train.checkpoint_every steps and --resume continues from it exactly.

    Example: emo pretrain --recipe recipes/tiny-emo.toml -o runs/tiny-emo
    """
    import torch

    from emo_cli.errors import EmoError
    from emo_cli.lab.pretrain import pretrain
    from emo_cli.lab.pretrain_recipe import load_recipe

    rec = load_recipe(recipe)
    if threads is not None:
        if threads < 1:
            raise EmoError("--threads must be at least 1")
        torch.set_num_threads(threads)
    out = out or Path("runs") / rec.name
    with ui.progress(disable=json_out) as prog:
        task = prog.add_task(f"{rec.name}", total=rec.train.steps, tokens=0)

        every = max(rec.train.log_every, rec.train.steps // 50)
        plain = not ui.err.is_terminal and not json_out  # a log file gets a line now and then, not a bar

        per_step = rec.train.batch_size * rec.train.seq_len
        start: dict[str, int] = {}

        def on_step(step, total, tokens, loss):
            session = tokens - start.setdefault("tokens", tokens - per_step)  # tokens/s of this run, even resumed
            prog.update(task, completed=step, tokens=session, description=f"{rec.name} loss {loss:.3f}")
            if plain and (step % every == 0 or step == total):
                el = prog.tasks[task].elapsed or 0.0
                ui.err.print(f"step {step}/{total}  loss {loss:.3f}  {session / max(el, 1e-9):,.0f} tok/s", markup=False)

        def log(msg):
            if not json_out:
                ui.err.print(msg, markup=False, highlight=False)

        command = f"emo pretrain --recipe {recipe} -o {out}" + (f" --threads {threads}" if threads else "")
        record = pretrain(rec, out, resume=resume, force=force, device=device, progress=on_step, log=log,
                          keep_checkpoint=keep_checkpoint, command=command)
    if json_out:
        ui.print_json(record)
        return
    rows = [["output", str(out)], ["steps", record["steps"]], ["tokens", record["tokens"]],
            ["train time (s)", record["train_seconds"]], ["tokens/s", record["tokens_per_second"]],
            ["parameters", record["parameters"]], ["final train loss", record["final_train_ce"]]]
    rows += [[f"held-out loss {d}", v] for d, v in record["heldout_loss"].items()]
    ui.out.print(ui.table(f"emo pretrain {rec.name}", ["", "value"], rows))
