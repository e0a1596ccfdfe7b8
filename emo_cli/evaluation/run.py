"""The `emo eval` pipeline: every model on every dataset, then one table with deltas."""

from __future__ import annotations

from emo_cli import ui
from emo_cli.data.documents import read_documents
from emo_cli.evaluation.loss import evaluate_loss
from emo_cli.evaluation.multiple_choice import evaluate_mc, is_multiple_choice, read_mc_items
from emo_cli.model.distributed import world
from emo_cli.model.memory import Workload
from emo_cli.runtime import load_model


def run_eval(models: list[str], data: list[str], max_docs=None, seq_len=2048, batch_size=8,
             text_field=None, device="cpu", dtype="auto", streaming="auto", max_memory=None, quiet=False,
             shots: int = 0) -> dict:
    datasets = []
    for d in data:
        if text_field is None and is_multiple_choice(d):
            datasets.append((d, "mc", read_mc_items(d, max_items=max_docs, shots=shots)))
        else:
            datasets.append((d, "lm", read_documents([d], text_field=text_field, max_docs=max_docs)))
    results, memory = [], {}
    with ui.progress(disable=quiet) as prog:
        for spec in models:
            lm = load_model(spec, device=world().device(device), dtype=dtype, streaming=streaming, max_memory=max_memory,
                            workload=Workload(batch_size, seq_len, passes=1), what=f"evaluating {spec}")
            if lm.memory:
                memory[spec] = lm.memory.as_dict()
            mode = " · streamed" if lm.memory and lm.memory.streaming else ""
            for name, kind, docs in datasets:
                step = ui.layer_steps(prog, f"{spec} · {name}{mode}", lm.model.num_layers,
                                      sum(len(it.choices) for it in docs) if kind == "mc" else len(docs))
                if kind == "mc":
                    r = evaluate_mc(lm.model, lm.tokenizer, docs, seq_len=seq_len, on_step=step)
                    results.append({"model": spec, "data": name, **r})
                    continue
                r = evaluate_loss(lm.model, lm.tokenizer, docs, seq_len=seq_len, batch_size=batch_size,
                                  on_step=step)
                results.append({"model": spec, "data": name, "loss": r.loss, "ppl": r.ppl,
                                "bits_per_byte": r.bits_per_byte, "tokens": r.tokens, "docs": r.docs})
            del lm
    if not quiet:
        _render(results, models)
    return {"results": results, "memory": memory}


def _render(results: list[dict], models: list[str]) -> None:
    lm_rows = [r for r in results if "loss" in r]
    mc_rows = [r for r in results if "acc" in r]
    if lm_rows:
        base = {res["data"]: res["loss"] for res in lm_rows if res["model"] == models[0]}
        rows = []
        for res in lm_rows:
            b = base.get(res["data"])
            delta = "" if res["model"] == models[0] or b is None else f"{100 * (res['loss'] / b - 1):+.2f}%"
            rows.append([res["model"], res["data"], res["loss"], res["ppl"], res["bits_per_byte"],
                         res["tokens"], res["docs"], delta])
        ui.out.print(ui.table("emo eval", ["model", "data", "loss", "ppl", "bits/byte", "tokens", "docs",
                                           "Δ loss vs first"], rows, justify_right_from=2))
    if mc_rows:
        base = {res["data"]: res["acc"] for res in mc_rows if res["model"] == models[0]}
        rows = [[r["model"], r["data"], r["acc"], r["acc_norm"], r["items"],
                 "" if r["model"] == models[0] else f"{100 * (r['acc'] - base.get(r['data'], 0)):+.1f} pts"]
                for r in mc_rows]
        ui.out.print(ui.table("emo eval: multiple choice", ["model", "data", "acc", "acc_norm", "items",
                                                            "Δ acc vs first"], rows, justify_right_from=2))
