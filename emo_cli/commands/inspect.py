"""`emo info` and `emo eval`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .. import ui
from . import options


def info(
    model: str = typer.Argument(..., help="HF model directory, HF repo id in the local cache, or .gguf file."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Layers, experts per layer, top-k, parameters, dtype, bytes on disk, pruning provenance.

    Example: emo info slim-med/      emo info slim-med.gguf --json
    """
    from ..info import model_info

    facts = model_info(model)
    if json_out:
        ui.print_json(facts)
        return
    rows = [["model", facts["model"]], ["format", facts["format"]]]
    if facts.get("quant"):
        rows.append(["quant", facts["quant"]])
    rows += [["layers", facts["layers"]], ["hidden / heads / kv heads",
             f"{facts['hidden_size']} / {facts['heads']} / {facts['kv_heads']}"],
             ["vocab", facts["vocab_size"]], ["top-k (incl. shared)", facts["top_k"]],
             ["params total", facts["params_total"]], ["params active / token", facts["params_active"]],
             ["dtype", facts["dtype"]], ["bytes on disk", facts["bytes"]]]
    groups: dict[tuple, list[int]] = {}
    for L in facts["experts_per_layer"]:
        key = ("dense",) if L["dense"] else (L["routed"], L["shared"], tuple(L["always_active"]))
        groups.setdefault(key, []).append(L["layer"])
    for key, layers in groups.items():
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        desc = "dense MLP" if key == ("dense",) else f"{key[0]} routed + {key[1]} shared" + (
            f", always active {list(key[2])}" if key[2] else "")
        rows.append([f"layers {span}", desc])
    for key, value in (facts.get("general") or {}).items():  # what llama.cpp / LM Studio / Ollama show
        rows.append([f"general.{key}", ", ".join(map(str, value)) if isinstance(value, list) else value])
    p = facts.get("pruning")
    if p:
        rows.append(["pruned from", p.get("original_model")])
        rows.append(["pruning method", p.get("pruning_method")])
        if p.get("budget"):
            rows.append(["budget", p.get("budget")])
    ui.out.print(ui.table("emo info", ["", "value"], rows))
    mem = facts.get("memory")
    if mem:
        mrows = [[cmd, mode, f"{gib:.1f}", "yes" if gib <= mem["available_gib"] else "no"]
                 for cmd, e in mem["commands"].items() for mode, gib in e["needs_gib"].items()]
        ui.out.print(ui.table(f"memory needed at batch 8 x 2048 tokens (this machine: {mem['available_gib']:.1f} "
                              "GiB available; emo picks the first mode that fits)",
                              ["command", "mode", "GiB", "fits"], mrows, justify_right_from=2))


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
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
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
    from ..errors import EmoError
    from ..evaluation_report import run_eval

    if not data and not tasks:
        raise EmoError("nothing to evaluate: pass --data DATA and/or --tasks TASK")
    if tasks:
        from ..lm_eval_tasks import run_tasks

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
