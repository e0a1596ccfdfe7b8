"""`emo merge-back`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emo_cli import ui


def merge_back(
    slim: str = typer.Argument(..., help="The slim HF directory (e.g. after finetuning it on its domain)."),
    into: str = typer.Option(..., "--into", help="The full model it was pruned from."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the merged full model."),
    average: Optional[float] = typer.Option(None, "--average", help="Write (1 - A) * full + A * slim instead of the "
                                            "slim weights (0..1)."),
    include: str = typer.Option("", "--include", help="Also merge: router (the kept experts' router rows), shared "
                                "(the shared expert), non-expert (attention, norms, embeddings, head); comma-separated."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    json_out: bool = typer.Option(False, "--json"),
):
    """Put a slim model's experts back into the full model at their original ids (EMO's
    reintegration): by default the routed experts' MLPs only. Writes merge_metadata.json.

    Example: emo merge-back slim-med-ft/ --into allenai/Emo_1b14b_1T -o emo-med-merged --average 0.5
    """
    from emo_cli.experts.merge_back import merge_back as run
    from emo_cli.experts.merge_back import parse_include
    from emo_cli.model.loading import resolve_model_path

    parts = parse_include(include)
    with ui.progress(disable=json_out) as prog:
        task = prog.add_task(f"writing {output} · tensors", total=None, bytes=0)
        record = run(resolve_model_path(slim), resolve_model_path(into), output, parts, average, force,
                     on_tensor=lambda done, total, nbytes: prog.update(task, completed=done, total=total, bytes=nbytes))
    if json_out:
        ui.print_json({"output": str(output), **record})
        return
    merged = sum(len(v) for v in record["experts_merged_per_layer"] if v)
    ui.out.print(ui.table("emo merge-back", ["", "value"], [
        ["output", str(output)], ["experts merged", merged], ["also merged", ", ".join(record["include"]) or "-"],
        ["average", record["average"] if record["average"] is not None else "- (slim weights)"]]))
