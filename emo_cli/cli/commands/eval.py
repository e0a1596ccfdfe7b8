"""`emo eval`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from emo_cli import ui
from emo_cli.cli.commands import options


def eval_cmd(
    models: List[str] = typer.Argument(..., help="One or more models (HF dir, cached repo id, .gguf)."),
    data: List[Path] = typer.Option([], "--data", help="Data file(s)/dirs; repeat for several."),
    tasks: List[str] = typer.Option([], "--tasks", help="lm-eval task names (needs emo-cli[eval]); repeat for "
                                    "several. Run on emo's runtime through the `emo` lm-eval model."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="A directory of your own lm-eval "
                                                "task YAMLs (local data)."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="Score at most N documents per dataset."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Truncate each document to N tokens."),
    batch_size: int = typer.Option(8, "--batch-size"),
    text_field: Optional[str] = typer.Option(None, "--text-field"),
    shots: int = typer.Option(0, "--shots", help="Multiple-choice data: N solved items of the same file before each "
                              "question (seeded, never itself), as `emo profile --shots` builds them."),
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    streaming: str = options.STREAMING,
    max_memory: Optional[float] = options.MAX_MEMORY,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Held-out loss, perplexity and bits/byte of each model on each dataset, side by side.

    Each document is scored alone (no BOS), truncated to --seq-len; loss is the token-weighted mean
    NLL (nats) of positions 1..n-1; bits/byte divides the total NLL in bits by the UTF-8 bytes of
    the scored text. Multiple-choice JSONL (question/choices/answer) reports acc and acc_norm.

    Example: emo eval allenai/Emo_1b14b_1T slim-med/ --data data/med-heldout.jsonl
             emo eval slim-med.gguf --tasks mmlu_clinical_knowledge --shots 5
             torchrun --nproc-per-node 4 -m emo_cli eval slim-med/ --data data/med-heldout.jsonl
    """
    from emo_cli.errors import EmoError
    from emo_cli.evaluation.run import run_eval

    if not data and not tasks:
        raise EmoError("nothing to evaluate: pass --data DATA and/or --tasks TASK")
    if tasks:
        from emo_cli.evaluation.lm_eval_tasks import run_tasks

        task_result = run_tasks(models, list(tasks), include_path, shots or None, max_docs, device, seq_len,
                                quiet=json_out)
        if not data:
            if json_out:
                ui.print_json(task_result)
            return
    result = run_eval(models, [str(d) for d in data], max_docs=max_docs, seq_len=seq_len,
                      batch_size=batch_size, text_field=text_field, device=device, dtype=dtype,
                      streaming=streaming, max_memory=max_memory, quiet=json_out, shots=shots)
    if tasks:
        result.update(task_result)
    if json_out:
        ui.print_json(result)
