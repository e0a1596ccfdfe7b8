"""Terminal output shared by the commands: progress bars on stderr, tables and JSON on stdout."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


class Throughput(ProgressColumn):
    """What moves and how fast, from the task's fields: `bytes` (writing: size and MB/s) or
    `tokens` (passes: tokens and tok/s). A task with neither shows only its count."""

    def render(self, task) -> Text:
        el = task.elapsed or 0.0
        if "bytes" in task.fields:
            n = task.fields["bytes"]
            return Text(f"{human_bytes(n)}  {n / el / 1e6 if el > 0 else 0.0:,.1f} MB/s", style="cyan")
        if "tokens" in task.fields:
            toks = task.fields["tokens"]
            return Text(f"{round(toks):,} tok  {toks / el if el > 0 else 0.0:,.0f} tok/s", style="cyan")
        return Text("")


def progress(disable: bool = False) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    Throughput(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=err, transient=False, disable=disable)


def layer_steps(prog: Progress, label: str, layers: int, docs: int):
    """A progress task for a layer-major pass: it counts document-layers (docs x layers in all),
    names the current layer, and credits tokens as whole-model tokens (1/layers per layer), so
    tok/s and the ETA are those of full forwards. Returns on_step(layer, n_docs, n_tokens)."""
    task = prog.add_task(f"{label} · layer 1/{layers}", total=max(layers * docs, 1), tokens=0)

    def on_step(layer: int, n_docs: int, n_tokens: int) -> None:
        prog.update(task, advance=n_docs, description=f"{label} · layer {layer + 1}/{layers}",
                    tokens=prog.tasks[task].fields["tokens"] + n_tokens / layers)

    return on_step


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def table(title: str, columns: list[str], rows: list[list], justify_right_from: int = 1) -> Table:
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="right" if i >= justify_right_from else "left")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.1f}"
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)
