"""`emo info`."""

from __future__ import annotations

import typer

from emo_cli import ui


def info(
    model: str = typer.Argument(..., help="HF model directory, HF repo id in the local cache, or .gguf file."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Layers, experts per layer, top-k, parameters, dtype, bytes on disk, pruning provenance.

    Example: emo info slim-med/      emo info slim-med.gguf --json
    """
    from emo_cli.info import model_info

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
