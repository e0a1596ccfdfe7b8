"""`emo demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from emo_cli import ui
from emo_cli.cli.commands import options
from emo_cli.experts.methods import DEFAULT_METHOD


def demo(
    out: Path = typer.Option(Path("emo-demo"), "--out", "-o", help="Where everything is written."),
    budget: str = typer.Option("25%", "--budget"),
    method: options.MethodChoice = typer.Option(DEFAULT_METHOD, "--method", parser=options.parse_method,
                                                help="Selection method (see emo prune --help)."),
    force: bool = typer.Option(False, "--force", help="Use --out even if it holds files emo demo did not write."),
    json_out: bool = typer.Option(False, "--json"),
    data_only: bool = typer.Option(False, "--data-only",
                                   help="Only write the demo text to OUT/data/ (med.jsonl, med-heldout.jsonl, "
                                        "code.jsonl, law.jsonl), in seconds; no model is run."),
):
    """Run the whole pipeline offline on the embedded tiny EMO model, in a few minutes: build medical
    data from pip-installed sources, profile, prune to 25%, export a Q8_0 GGUF, compare held-out loss
    (full / slim / random subset / a standard MoE pruned the same way), and complete a prompt.

    Example: emo demo            emo demo --budget 12.5% --out /tmp/demo
             emo demo --data-only --out .    (then: EMO_MODEL=tiny-emo emo profile data/med.jsonl)
    """
    from emo_cli.lab.demo import DemoSettings, render, run_demo, write_demo_data

    if data_only:
        files = write_demo_data(out, force=force)
        if json_out:
            ui.print_json({"data": [str(p) for p in files]})
        else:
            ui.out.print("wrote " + ", ".join(str(p) for p in files))
        return

    result = run_demo(DemoSettings(out=out, budget=budget, method=method.value, force=force, quiet=json_out))
    if json_out:
        ui.print_json(result)
    else:
        render(result)
