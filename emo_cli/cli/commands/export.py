"""`emo export`: HF EMO directory -> GGUF that llama.cpp runs exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emo_cli import ui
from emo_cli.cli.commands import options


def export(
    model: str = typer.Argument(..., help="HF model directory (or HF repo id in the local cache)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="FILE.gguf (default: <model name>.gguf here)."),
    quant: options.QuantChoice = typer.Option("f16", "--quant", "-q", parser=options.parse_quant, help="K-quants "
                                              "are made by llama.cpp; the router and norms stay f32."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Write MODEL as a GGUF file (llama.cpp 'deepseek' architecture, exact at f32).

    Refused, with the reason, when llama.cpp cannot run the model exactly (per-layer expert
    counts, always-active experts, dense layers after MoE layers, dense MLP biases...).

    Example: emo export slim-med/ -o slim-med.gguf --quant q4_k_m
    """
    from emo_cli.errors import EmoError
    from emo_cli.gguf.export import export_gguf
    from emo_cli.model.loading import is_gguf, resolve_model_path

    path = resolve_model_path(model)
    if is_gguf(path):
        raise EmoError(f"{path} is already a GGUF file; export from the HF model directory")
    out = output if output is not None else Path(f"{path.resolve().name}.gguf")
    with ui.progress(disable=json_out) as prog:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int, nbytes: int) -> None:
            if stage not in tasks:
                label = f"writing {out.name} · tensors" if stage == "writing" else "llama.cpp quantize"
                tasks[stage] = prog.add_task(label, total=total, bytes=0)
            prog.update(tasks[stage], completed=done, total=total, bytes=nbytes)

        result = export_gguf(path, out, quant=quant.value, force=force, progress=on_progress)
    if json_out:
        ui.print_json(result)
        return
    ui.out.print(ui.table("emo export", ["file", "quant", "size", "x f32 size"],
                          [[result["output"], result["quant"], ui.human_bytes(result["bytes"]), f"{result['ratio']:.3f}"]]))

