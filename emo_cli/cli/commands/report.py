"""`emo report PROFILE...`: usage heatmaps, coverage curves and kept-set overlap in one HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from emo_cli import ui
from emo_cli.cli.commands import options
from emo_cli.experts.methods import DEFAULT_METHOD, REPORT_METHODS


def report(
    profiles: List[Path] = typer.Argument(..., help="Profiles of one model (from `emo profile`), one per domain."),
    output: Path = typer.Option(Path("report.html"), "-o", "--output", help="Self-contained HTML file."),
    budget: str = typer.Option("25%", "--budget", "-b", help="Budget of the kept sets compared across domains, "
                               "as in `emo prune`: 25% or a count like 32 (shared experts included)."),
    method: options.ReportMethodChoice = typer.Option(DEFAULT_METHOD, "--method", parser=options.parse_report_method,
                                                      help="How the kept sets are chosen: "
                                                      + options.method_labels(REPORT_METHODS)),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing report."),
    json_out: bool = typer.Option(False, "--json"),
):
    """Which experts do my domains use, how many does each need, and how much do their kept sets overlap?
    Writes one HTML file (figures embedded, nothing fetched) and prints a summary.

    Examples:  emo report med.profile.safetensors code.profile.safetensors -o report.html --budget 25%
    """
    from emo_cli.experts.usage_profile import Profile
    from emo_cli.experts.usage_report import (
        build_report,
        check_output,
        expected_figures,
        render_html,
        summary,
        write_html,
    )

    check_output(output, force)  # before any work: an existing report is never silently replaced
    profs = [Profile.load(p) for p in profiles]
    rep = build_report(profs, list(profiles), budget=budget, method=method.value)
    if json_out:
        page = render_html(rep)
    else:
        with ui.err.status(f"rendering {expected_figures(len(profs))} figures"):
            page = render_html(rep)
    write_html(output, page, force=force)
    s = summary(rep, output)
    if json_out:
        ui.print_json(s)
        return
    rows = []
    for p in s["profiles"]:
        routed = sorted({layer["routed"] for layer in p["layers"]})
        kept = sorted({len(layer["kept"]) for layer in p["layers"]})
        rows.append([p["name"], p["docs"], p["tokens"], _span(routed), f"{p['mean_cover50']:.2f}",
                     f"{p['mean_cover90']:.2f}", _span(kept)])
    ui.out.print(ui.table("routed experts carrying 50% / 90% of the routing mass (mean over layers)",
                          ["profile", "docs", "tokens", "routed", "50% mass", "90% mass", f"kept {rep.budget}"], rows))
    if s["pairs"]:
        chance = sum(s["chance_jaccard"].values()) / max(1, len(s["chance_jaccard"]))
        prow = []
        for pair in s["pairs"]:
            low_layer, low = min(pair["jaccard"].items(), key=lambda kv: kv[1])
            prow.append([pair["a"], pair["b"], f"{pair['mean_jaccard']:.3f}", f"{low:.3f} (layer {low_layer})",
                         f"{chance:.3f}"])
        ui.out.print(ui.table(f"overlap of kept routed experts at {rep.budget} ({rep.method}): Jaccard",
                              ["profile", "profile", "mean", "lowest", "random sets"], prow, justify_right_from=2))
    ui.out.print(f"wrote {output} ({expected_figures(len(profs))} figures)")


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
