"""`emo demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from .. import ui


def demo(
    out: Path = typer.Option(Path("emo-demo"), "--out", "-o", help="Where everything is written."),
    budget: str = typer.Option("25%", "--budget"),
    method: str = typer.Option("frequency", "--method", help="Selection method (see emo prune --help)."),
    force: bool = typer.Option(False, "--force", help="Use --out even if it holds files emo demo did not write."),
    json_out: bool = typer.Option(False, "--json"),
):
    """Run the whole pipeline offline on the embedded tiny EMO model, in a few minutes: build medical
    data from pip-installed sources, profile, prune to 25%, export a Q8_0 GGUF, compare held-out loss
    (full / slim / random subset / a standard MoE pruned the same way), and complete a prompt.

    Example: emo demo            emo demo --budget 12.5% --out /tmp/demo
    """
    from ..demo import DemoSettings, render, run_demo

    result = run_demo(DemoSettings(out=out, budget=budget, method=method, force=force, quiet=json_out))
    if json_out:
        ui.print_json(result)
    else:
        render(result)
