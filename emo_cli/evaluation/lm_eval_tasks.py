"""`emo eval --tasks`: lm-eval tasks on emo's runtime, through the same `emo` lm-eval model that
`python -m emo_cli.evaluation.lm_eval_model` registers (lm-eval is the optional extra `emo-cli[eval]`)."""

from __future__ import annotations

from pathlib import Path

from emo_cli import ui
from emo_cli.errors import EmoError


def run_tasks(models: list[str], tasks: list[str], include_path: Path | None = None, shots: int | None = None,
              limit: int | None = None, device: str = "cpu", seq_len: int = 2048, batch_size: int = 16,
              quiet: bool = False) -> dict:
    """Every model on every task; rows of (model, task, metric, value, stderr)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EmoError("--tasks runs lm-eval tasks: pip install 'emo-cli[eval]' (lm-eval 0.4)") from None
    from emo_cli.evaluation.lm_eval_model import EmoLM

    if include_path is not None and not Path(include_path).is_dir():
        raise EmoError(f"{include_path}: no such task directory")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise EmoError(f"unknown lm-eval task {unknown[0]!r} (see `lm_eval ls tasks`, or pass --include-path DIR)")
    rows = []
    for spec in models:
        lm = EmoLM(spec, device=device, max_length=seq_len, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=shots,
                                      limit=limit, log_samples=False, verbosity="ERROR")
        for task, metrics in sorted(out["results"].items()):
            for key, value in metrics.items():
                name, _, flt = key.partition(",")
                if flt and not name.endswith("_stderr") and isinstance(value, (int, float)):
                    rows.append({"model": spec, "task": task, "metric": name, "filter": flt, "value": value,
                                 "stderr": metrics.get(f"{name}_stderr,{flt}")})
    if not quiet:
        ui.out.print(ui.table("emo eval: lm-eval tasks", ["model", "task", "metric", "value", "± stderr"],
                              [[r["model"], r["task"], r["metric"], r["value"], r["stderr"]] for r in rows],
                              justify_right_from=3))
    return {"tasks": rows}
